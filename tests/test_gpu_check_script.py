"""benchmarks/gpu_check.sh, the one prepared GPU script, on the CPU: read as text (every section its default list
and its presets name has a branch, every file a branch runs exists) and run with python3 and nvidia-smi stubbed
(results packed after every section, caps, the budget). A GPU session is rare and short; a typo there would spend
it on "unknown section", and a run that outlives the device's limit returns nothing. Also the GPU suites' allocator
poisoning (tests/conftest.py) with CUDA stubbed."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = open(os.path.join(ROOT, "benchmarks", "gpu_check.sh")).read()
BRANCHES = dict(re.findall(r"^\s+([a-z0-9-]+)\) (.*?);;", SCRIPT, flags=re.M | re.S))


def _named_lists() -> dict[str, list[str]]:
    lists = {"default": re.search(r'sections="\$\{\*:-([^}]*)\}"', SCRIPT).group(1).split()}
    for preset, names in re.findall(r'sections="\$\{sections//([a-z0-9-]+)/([^}]*)\}"', SCRIPT):
        lists[preset] = names.split()
    return lists


def test_the_script_has_its_sections_and_presets():
    assert len(BRANCHES) >= 20 and "issue10" in _named_lists(), sorted(BRANCHES)


@pytest.mark.parametrize("name,sections", sorted(_named_lists().items()))
def test_every_listed_section_has_a_branch(name, sections):
    assert sections and not [s for s in sections if s not in BRANCHES], f"{name}: {sections}"


@pytest.mark.parametrize("section", sorted(BRANCHES))
def test_every_file_a_branch_runs_exists(section):
    paths = re.findall(r"(?:benchmarks|tests)/[\w/]+\.py", BRANCHES[section])
    modules = re.findall(r"-m (fastft(?:\.\w+)+)", BRANCHES[section])
    missing = [p for p in paths if not os.path.exists(os.path.join(ROOT, p))]
    missing += [m for m in modules if not os.path.exists(os.path.join(ROOT, *m.split(".")) + ".py")]
    assert not missing, f"{section}: {missing}"


def test_issue10_runs_the_kernel_suites_first_then_lora_paths_and_no_host():
    issue10 = _named_lists()["issue10"]
    assert issue10[:4] == ["build", "kernel-tests", "large-offsets", "lora-paths"] and "host" not in issue10, issue10


# The script's control flow, run for real with python3 and nvidia-smi stubbed: each stub call records what had come
# back by then, sleeps when its arguments contain $STUB_SLOW, and writes the JSON its benchmark writes.
STUB = r"""#!/usr/bin/env bash
{ echo "CALL $*"; tar -tzf "$STUB_RESULTS/results.tar.gz" 2>/dev/null | sed 's/^/  has /'
  [[ -f "$STUB_RESULTS/summary.md" ]] && echo "  has summary.md"; } >> "$STUB_LOG"
case "$*" in
  *gpu_nf4.py*) echo '{}' > "$OUT/nf4.json" ;;
  *gpu_lora_paths.py*) echo '{}' > "$OUT/lora_paths.json" ;;
  *gpu_lora.py*) echo '{}' > "$OUT/lora.json" ;;
  *gpu_attention.py*) echo '{}' > "$OUT/attention.json" ;;
esac
echo "stub: $*"
if [[ -n "${STUB_SLOW:-}" && "$*" == *"$STUB_SLOW"* ]]; then exec sleep 30; fi
"""


def _run_script(tmp_path, sections, **env):
    import subprocess
    import time

    bin_dir, out, work = tmp_path / "bin", tmp_path / "out", tmp_path / "work"
    for d in (bin_dir, out, work):
        d.mkdir()
    (bin_dir / "python3").write_text(STUB)
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA H200, 143771 MiB'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    log = tmp_path / "calls.log"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=str(out), TMPDIR=str(work),
               STUB_RESULTS=str(out), STUB_LOG=str(log), **env)
    t0 = time.monotonic()
    run = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), *sections], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    wall = time.monotonic() - t0
    calls = log.read_text().split("CALL ")[1:] if log.exists() else []
    summary = (out / "summary.md").read_text()
    rows = dict(re.findall(r"^\| ([a-z0-9-]+) \| ([^|]*) \|", summary, flags=re.M))
    rows.pop("section")  # the header
    return run, wall, calls, out, rows


def _tar_names(path) -> set[str]:
    import tarfile

    with tarfile.open(path) as tar:
        return {os.path.basename(m.name) for m in tar.getmembers() if m.isfile()}


def test_every_section_leaves_results_and_summary_and_at_most_two_files_come_back(tmp_path):
    run, _, calls, out, rows = _run_script(tmp_path, ["issue10"])
    assert run.returncode == 0, run.stdout + run.stderr
    sections = _named_lists()["issue10"]
    assert rows == {s: "ok" for s in sections}
    assert sorted(os.listdir(out)) == ["results.tar.gz", "summary.md"]  # the device returns at most 8 files
    assert _tar_names(out / "results.tar.gz") == ({f"{s}.txt" for s in sections} |
                                                  {"nf4.json", "lora_paths.json", "lora.json", "attention.json"})
    # the calls after the preamble: each finds the logs of every section before it packed and the summary written
    # not the preamble's or the xdist probe, nor the verdicts read from the JSON at the end
    section_calls = [c for c in calls if not c.startswith("-c ") and "candidates.py" not in c]
    assert "benchmarks/candidates.py" in calls[-1]
    assert len(section_calls) == len(sections)
    for i, call in enumerate(section_calls):
        assert "has summary.md" in call
        assert all(f"has ./{s}.txt" in call for s in sections[:i]), (sections[i], call)


def test_a_section_over_its_cap_is_cut_and_the_next_ones_still_run(tmp_path):
    run, wall, calls, out, rows = _run_script(tmp_path, ["build", "nf4", "attention", "lora"], STUB_SLOW="gpu_nf4.py",
                                              FASTFT_GPU_SECTION_MAX="2", FASTFT_GPU_GRACE="1")
    assert run.returncode == 1
    assert rows["nf4"].startswith("cut at its 2s cap") and rows["attention"] == rows["lora"] == rows["build"] == "ok"
    assert wall < 15, wall
    assert {"nf4.txt", "lora.txt", "attention.json"} <= _tar_names(out / "results.tar.gz")


def test_the_budget_bounds_the_whole_run_and_later_sections_are_reported_skipped(tmp_path):
    budget = 6
    run, wall, calls, out, rows = _run_script(
        tmp_path, ["build", "nf4", "attention", "lora"], STUB_SLOW="gpu_nf4.py", FASTFT_GPU_BUDGET=str(budget),
        FASTFT_GPU_RESERVE="2", FASTFT_GPU_MIN_SECTION="1", FASTFT_GPU_GRACE="1")
    assert run.returncode == 1
    assert rows["build"] == "ok" and rows["nf4"].startswith("cut at its")
    assert rows["attention"].startswith("skipped") and rows["lora"].startswith("skipped")
    assert not [c for c in calls if "gpu_attention.py" in c or "gpu_lora.py" in c]
    assert wall <= budget + 1, wall
    assert "| nf4 | cut at its" in run.stdout  # the summary table is printed last (the output tail keeps it)


def test_gpu_tests_poison_every_free_block_of_both_allocator_pools(monkeypatch):
    """tests/conftest.py's poison_cuda_allocator (the GPU suites' unwritten-output check), with CUDA stubbed: every
    free block of the caching allocator is filled with 0xFF bytes (NaN in every float dtype), small pool and large,
    a freed block inside a segment that still holds live tensors too; room in both pools is reserved first. It used
    to fill 4 fresh 256 MiB blocks only: outputs ≤ 1 MiB come from the small pool and missed them, and its fp32 NaN
    read as bf16 is half zeros."""
    import torch

    from tests import conftest

    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        assert torch.full((8,), 0xFF, dtype=torch.uint8).view(dtype).isnan().all()
    snapshot = [
        dict(device=0, segment_type="large", is_expandable=False, blocks=[
            dict(address=0x1000000, size=2 << 20, state="active_allocated"),  # a live input
            dict(address=0x1200000, size=6 << 20, state="inactive")]),  # a freed output beside it
        dict(device=0, segment_type="small", blocks=[
            dict(address=0x9000, size=512, state="inactive"),
            dict(address=0x9200, size=(2 << 20) - 512, state="active_pending_free")]),
        dict(device=1, segment_type="small", blocks=[dict(address=0x7000, size=4096, state="inactive")]),
        dict(device=0, segment_type="large", is_expandable=True, blocks=[
            dict(address=0x5000000, size=20 << 20, state="inactive")]),
    ]
    reserved, filled = [], []

    class Span:
        def __init__(self, interface):
            self.interface = interface

        def fill_(self, value):
            filled.append((self.interface["data"][0], self.interface["shape"][0], value))

    monkeypatch.setattr(torch, "empty", lambda n, dtype, device: reserved.append(n))
    monkeypatch.setattr(torch, "as_tensor", lambda obj, device: Span(obj.__cuda_array_interface__))
    monkeypatch.setattr(torch.cuda, "memory_snapshot", lambda: snapshot)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    conftest.poison_free_cuda_memory()
    assert filled == [(0x1200000, 6 << 20, 0xFF), (0x9000, 512, 0xFF)]
    assert max(reserved) > 1 << 20 and min(reserved) <= 1 << 20  # the large pool and the small one (≤ 1 MiB)
