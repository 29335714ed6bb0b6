"""`fastft bench` review fixes: each compiled run gets a fresh dynamo and records what compiled (a run that fell
back to eager is "not compiled"); a NaN loss is a "diverged" row and results JSON is strict (null, never NaN);
a killed table is marked incomplete and the same command resumes it (other settings are refused, --fresh
replaces); the targets need the reference method settings; flags of the other mode, --warmup 0, an empty
--output-dir and a rank above the hidden size are refused; the plot labels its axis and leaves out CPU memory.
Fast: unit tests, one tiny LoRA run per behaviour, and fake runs for the table's files."""
import json
import sys

import pytest
import torch

from fastft.apps import cli
from fastft.apps.bench import methods as methods_module
from fastft.apps.bench import run
from fastft.apps.bench.config import BenchConfig
from fastft.apps.bench.harness import write_json
from fastft.apps.bench import report
from fastft.apps.bench.targets import check_targets

CPU = torch.device("cpu")
TINY = dict(shape="tiny", steps=1, warmup=1, seq_len=8, batch_size=1)


def _strict_json(path):
    """The file parsed as standard JSON (Python's json accepts NaN/Infinity unless told not to)."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")
    return json.loads(path.read_text(), parse_constant=refuse)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fastft bench: error:"), err
    return err


# --- 1: compiled rows ------------------------------------------------------------------------------------------

def test_dynamo_counts_see_a_recompile_limit_hit():
    def f(x, k):
        return x * k + 1

    compiled = torch.compile(f, backend="eager", dynamic=False)
    torch._dynamo.reset()
    before = run.dynamo_counts()
    with torch._dynamo.config.patch(recompile_limit=1):
        for k in range(3):   # each int specialises: the second recompile is over the limit
            compiled(torch.ones(2), k)
    after = run.dynamo_counts()
    assert after["graphs"] - before["graphs"] == 1
    assert after["recompile_limit_hits"] > before["recompile_limit_hits"]


def test_each_compiled_run_starts_from_a_fresh_dynamo():
    """With a recompile limit of 1, a second model's run still compiles its own graph (dynamo was reset), and the
    row says how many graphs and graph breaks it got."""
    cfg = BenchConfig(**TINY, methods=("lora",), peers=("peft",), compile="default", compile_backend="eager")
    with torch._dynamo.config.patch(recompile_limit=1):
        rows = [run.run_one(cfg, "lora", "peft", CPU, compile="default") for _ in range(2)]
    for row in rows:
        assert row["status"] == "ok", row
        assert row["compile_stats"]["graphs"] >= 1 and row["compile_stats"]["recompile_limit_hits"] == 0, row
        assert "graph_breaks" in row["compile_stats"]
    assert "graphs" in report.table_rows({"rows": rows})[0]["note"]   # the table says what compiled


@pytest.mark.parametrize("stats, status, words", [
    ({"graphs": 3, "graph_breaks": 4, "recompile_limit_hits": 2}, "not compiled", "recompile limit"),
    ({"graphs": 0, "graph_breaks": 0, "recompile_limit_hits": 0}, "not compiled", "no graph"),
    ({"graphs": 2, "graph_breaks": 1, "recompile_limit_hits": 0}, "ok", None),
])
def test_a_compile_that_fell_back_is_not_labelled_compiled(stats, status, words):
    verdict = run._verdict({"loss_first": 6.0, "loss_last": 5.0, "compile_stats": stats})
    assert verdict["status"] == status
    assert words is None or words in verdict["reason"]


# --- 2: diverged runs, strict JSON -----------------------------------------------------------------------------

def test_json_is_strict_with_null_for_non_finite_floats(tmp_path):
    path = write_json(tmp_path / "r.json", {"a": float("nan"), "b": [1.5, float("inf"), (float("-inf"),)],
                                            "c": {"d": float("nan")}, "e": tmp_path})
    assert _strict_json(path) == {"a": None, "b": [1.5, None, [None]], "c": {"d": None}, "e": str(tmp_path)}


def test_a_diverged_run_is_its_own_status_out_of_ratios_and_targets(tmp_path):
    cfg = BenchConfig(**dict(TINY, steps=2), methods=("lora",), peers=(), alpha=1e30)   # step 1 trains B: overflow
    row = run.run_one(cfg, "lora", "fastft", CPU)
    assert row["status"] == "diverged" and "non-finite" in row["reason"], row
    peer = dict(row, peer="peft", implementation="peft", status="ok", loss_last=5.0)
    result = {"environment": {"card": "NVIDIA H200", "versions": {}}, "rows": [row, peer],
              "config": dict(vars(BenchConfig(shape="llama-1b")), device="cuda", dtype_resolved="bf16")}
    text = report.markdown(result)
    assert "| lora | fastft | diverged | off | — |" in text
    assert "lora ≥ 90k tokens/s at ≤ 15 GiB (H200): not measured" in text
    _strict_json(write_json(tmp_path / "r.json", result))


# --- 3: a killed table, resumed ---------------------------------------------------------------------------------

def _fake_run_one(calls, kill_after=None):
    def run_one(cfg, method, implementation, device, compile="off"):
        if kill_after is not None and len(calls) >= kill_after:
            raise KeyboardInterrupt("killed")
        calls.append((method, implementation))
        return {"method": method, "implementation": implementation, "peer": implementation, "compile": compile,
                "status": "ok", "tokens_per_s": 1000.0, "step_ms": 8.0, "peak_gib": 0.1, "trainable_params": 10,
                "memory_kind": "cpu peak RSS", "loss_first": 6.0, "loss_last": 5.0}
    return run_one


def _bench(out, *extra):
    return cli.main(["bench", "--shape", "tiny", "--methods", "lora", "dora", "--peers", "peft", "--warmup", "1",
                     "--output-dir", str(out), *extra])


def test_a_killed_table_is_marked_incomplete_and_the_same_command_resumes_it(tmp_path, monkeypatch):
    (tmp_path / "bench_methods.png").write_bytes(b"an older run's plot")
    calls = []
    monkeypatch.setattr(methods_module, "run_one", _fake_run_one(calls, kill_after=1))
    with pytest.raises(KeyboardInterrupt):
        _bench(tmp_path)
    left = _strict_json(tmp_path / "bench_methods.json")
    assert left["complete"] is False
    assert [r["status"] for r in left["rows"]] == ["ok", "planned", "planned", "planned"]
    assert "**Incomplete**: 3 of 4 runs" in (tmp_path / "bench_methods.md").read_text()
    assert not (tmp_path / "bench_methods.png").exists()   # no plot of another table beside this one

    calls.clear()
    monkeypatch.setattr(methods_module, "run_one", _fake_run_one(calls))
    assert _bench(tmp_path) == 0
    assert calls == [("lora", "peft"), ("dora", "fastft"), ("dora", "peft")]   # the finished row is kept
    done = _strict_json(tmp_path / "bench_methods.json")
    assert done["complete"] is True and [r["status"] for r in done["rows"]] == ["ok"] * 4
    assert "Incomplete" not in (tmp_path / "bench_methods.md").read_text()


def test_a_table_of_other_settings_is_refused_and_fresh_replaces_it(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(methods_module, "run_one", _fake_run_one(calls))
    assert _bench(tmp_path, "--formats", "json") == 0
    calls.clear()
    assert _bench(tmp_path, "--formats", "json", "md") == 0   # complete, same settings: measured again
    assert len(calls) == 4
    capsys.readouterr()
    calls.clear()
    assert _bench(tmp_path, "--seq-len", "16") == 2
    err = _one_line_error(capsys)
    assert "--output-dir" in err and "--fresh" in err and "seq_len: 2048 there, 16 now" in err and not calls
    assert _bench(tmp_path, "--seq-len", "16", "--fresh", "--formats", "json") == 0 and len(calls) == 4
    assert _strict_json(tmp_path / "bench_methods.json")["config"]["seq_len"] == 16


@pytest.mark.parametrize("change, named", [("commit", "git_commit"), ("threads", "torch_threads"),
                                           ("kernels", "kernel environment")])
def test_a_resume_under_other_code_or_threads_is_refused(tmp_path, monkeypatch, capsys, change, named):
    """fastft's version does not change between commits, and CPU rows scale with the thread count: a row measured
    by other code or threads would sit in one table beside these (a 50 ms slower step read as 5.6x peft). So would
    a row of another kernel backend (FASTFT_LORA_BACKEND=triton: the interpreter's 26 tokens/s beside 4,359)."""
    import torch

    import fastft.apps.provenance as provenance

    calls = []
    monkeypatch.setattr(methods_module, "run_one", _fake_run_one(calls, kill_after=1))
    with pytest.raises(KeyboardInterrupt):
        _bench(tmp_path)
    if change == "commit":
        monkeypatch.setattr(provenance, "git_commit", lambda: "f" * 40)
    elif change == "threads":
        monkeypatch.setattr(torch, "get_num_threads", lambda: 977)
    else:
        monkeypatch.setenv("FASTFT_LORA_BACKEND", "torch")
    capsys.readouterr()
    monkeypatch.setattr(methods_module, "run_one", _fake_run_one(calls))
    assert _bench(tmp_path) == 2
    err = _one_line_error(capsys)
    assert named in err and "--fresh" in err and calls == [("lora", "fastft")]


@pytest.mark.parametrize("fmt", ["json", "png"])
def test_a_folder_named_like_a_results_file_is_a_one_line_error(tmp_path, monkeypatch, capsys, fmt):
    """It gave IsADirectoryError tracebacks: at the first row's write (json) or while clearing old outputs (png)."""
    calls = []
    monkeypatch.setattr(methods_module, "run_one", _fake_run_one(calls))
    (tmp_path / f"bench_methods.{fmt}").mkdir()
    assert _bench(tmp_path) == 2 and not calls
    assert f"bench_methods.{fmt} is a folder" in _one_line_error(capsys)


def test_a_resume_runs_failed_rows_again(tmp_path, monkeypatch):
    """A crash or an OOM (transient, or memory another row left fragmented) was kept on resume, never retried."""
    calls = []
    monkeypatch.setattr(methods_module, "run_one", _fake_run_one(calls, kill_after=2))
    with pytest.raises(KeyboardInterrupt):
        _bench(tmp_path)
    table = json.loads((tmp_path / "bench_methods.json").read_text())
    table["rows"][1].update(status="error", error="RuntimeError: CUDA error: unspecified launch failure")
    (tmp_path / "bench_methods.json").write_text(json.dumps(table))
    calls.clear()
    monkeypatch.setattr(methods_module, "run_one", _fake_run_one(calls))
    assert _bench(tmp_path) == 0
    assert calls == [("lora", "peft"), ("dora", "fastft"), ("dora", "peft")]


def test_a_finished_table_measured_again_stays_until_the_first_new_row(tmp_path, monkeypatch):
    """Rerunning the command of a finished table wrote it over with planned rows at once: killed before the first
    row, the finished table was gone."""
    monkeypatch.setattr(methods_module, "run_one", _fake_run_one([]))
    assert _bench(tmp_path, "--formats", "json", "md") == 0
    before = (tmp_path / "bench_methods.json").read_text()
    monkeypatch.setattr(methods_module, "run_one", _fake_run_one([], kill_after=0))
    with pytest.raises(KeyboardInterrupt):
        _bench(tmp_path, "--formats", "json", "md")
    assert (tmp_path / "bench_methods.json").read_text() == before


def test_a_resume_stopped_before_its_first_row_keeps_the_measured_rows(tmp_path, monkeypatch):
    """Stopped while it imports the peers (before it writes anything), a resume leaves the table it read."""
    calls = []
    monkeypatch.setattr(methods_module, "run_one", _fake_run_one(calls, kill_after=1))
    with pytest.raises(KeyboardInterrupt):
        _bench(tmp_path)

    def stopped():
        raise KeyboardInterrupt("killed while importing the peers")

    with monkeypatch.context() as patch:
        patch.setattr(methods_module.peers, "preload", stopped)
        with pytest.raises(KeyboardInterrupt):
            _bench(tmp_path)
    assert [r["status"] for r in _strict_json(tmp_path / "bench_methods.json")["rows"]][0] == "ok"
    calls.clear()
    monkeypatch.setattr(methods_module, "run_one", _fake_run_one(calls))
    assert _bench(tmp_path) == 0 and len(calls) == 3


# --- 4: targets -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("setting, named", [({"rank": 1}, "rank=1"), ({"alpha": 2.0}, "alpha=2.0"),
                                            ({"num_virtual_tokens": 8}, "num_virtual_tokens=8"),
                                            ({"patch_model": False}, "patch_model=False"),
                                            ({"optimizer": "adamw-8bit"}, "optimizer=adamw-8bit"),
                                            ({"warmup": 0}, "--warmup 0")])
def test_targets_are_checked_only_at_the_reference_settings(setting, named):
    rows = [dict(method="lora", peer="fastft", status="ok", tokens_per_s=95e3, peak_gib=14.0, step_ms=86.0)]
    config = dict(vars(BenchConfig(shape="llama-1b")), device="cuda", dtype_resolved="bf16")
    result = {"config": config, "environment": {"card": "NVIDIA H200"}, "rows": rows}
    assert check_targets(result)[0].endswith("**met**")
    before = {k: v for k, v in config.items() if k != "optimizer"}  # a file written before --optimizer: AdamW
    assert check_targets(dict(result, config=before))[0].endswith("**met**")
    first = check_targets(dict(result, config=config | setting))[0]
    assert first.startswith("- not checked") and named in first, first


# --- 5: flags ---------------------------------------------------------------------------------------------------

@pytest.fixture
def no_run(monkeypatch):
    monkeypatch.setattr(methods_module, "bench_methods", lambda *a, **k: pytest.fail("a run started"))


@pytest.mark.parametrize("argv, names", [
    (["kernels", "--steps", "0"], ["--steps", "bench methods"]),
    (["kernels", "--rank", "-5"], ["--rank", "bench methods"]),
    (["kernels", "--fresh"], ["--fresh"]),
    (["--shape", "tiny", "--family", "lora"], ["--family", "bench kernels"]),
    (["--shape", "tiny", "--warmup", "0"], ["--warmup", "at least 1"]),
    (["--shape", "tiny", "--output-dir", ""], ["--output-dir", "empty"]),
    (["--shape", "tiny", "--seed", str(2**64)], ["--seed must be in [0, 2**32 - 1]"]),
    (["kernels", "--output-dir", " "], ["--output-dir", "empty"]),
    (["--shape", "tiny", "--peers", ""], ["--peers is empty", "none"]),  # meant no peers; --methods "" is refused
    (["--shape", "tiny", "--formats", "json,json"], ["--formats: json given twice"]),
])
def test_flags_that_do_not_apply_are_refused(capsys, no_run, argv, names):
    assert cli.main(["bench", *argv]) == 2
    err = _one_line_error(capsys)
    assert all(n in err for n in names), err


def test_a_rank_above_the_hidden_size_is_refused_where_a_method_uses_it():
    with pytest.raises(ValueError, match="--rank 65 is larger than --shape tiny's hidden size 64"):
        BenchConfig(shape="tiny", rank=65, methods=("ia3", "dora")).validate()
    BenchConfig(shape="tiny", rank=64).validate()
    BenchConfig(shape="tiny", rank=65, methods=("ia3", "full")).validate()


def test_flags_no_benchmarked_method_reads_are_noted(capsys, monkeypatch, tmp_path):
    """--methods ia3 --rank 8 --num-virtual-tokens 4 ran without a word, its report naming r=8 and 4 virtual tokens
    for a table holding only IA3; --shape beside --model was dropped silently."""
    from fastft.apps.bench.report import _method_knobs

    monkeypatch.setattr(methods_module, "bench_methods", lambda *a, **k: (_ for _ in ()).throw(SystemExit(0)))
    with pytest.raises(SystemExit):
        cli.main(["bench", "--methods", "ia3", "--rank", "8", "--alpha", "3", "--num-virtual-tokens", "4",
                  "--shape", "tiny", "--output-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    for flag in ("--rank", "--alpha", "--num-virtual-tokens"):
        assert f"note: {flag} is not used (no method in --methods reads it)" in out
    assert "--shape" not in out
    config = {"methods": ["ia3"], "rank": 8, "alpha": 3.0, "num_virtual_tokens": 4}  # the report header's knobs
    assert _method_knobs(config) == ""
    assert _method_knobs({**config, "methods": ["ia3", "lora"]}) == "LoRA/DoRA r=8 alpha=3; "


def test_a_rank_above_a_local_models_hidden_size_is_refused(tmp_path):
    """Only --shape was checked: --model DIR --rank 100 benchmarked r=100 on a hidden size of 64."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4).save_pretrained(
        tmp_path)
    with pytest.raises(ValueError, match=f"--rank 100 is larger than --model {tmp_path}'s hidden size 64"):
        BenchConfig(model=str(tmp_path), rank=100, methods=("lora",)).validate()
    BenchConfig(model=str(tmp_path), rank=64, methods=("lora",)).validate()


def test_a_rank_above_the_builtin_models_hidden_size_is_refused_before_it_loads(monkeypatch):
    """--model smollm2-135m --rank 1000 ran ("known once it loads", but nothing checked it after loading)."""
    import fastft.apps.bench.config as config_module

    monkeypatch.setattr(config_module, "model_problem", lambda name, what: None)   # its packages need not be here
    with pytest.raises(ValueError, match="--rank 1000 is larger than --model smollm2-135m's hidden size 576"):
        BenchConfig(model="smollm2-135m", rank=1000, methods=("lora",)).validate()
    BenchConfig(model="smollm2-135m", rank=576, methods=("lora",)).validate()


def test_help_says_which_flags_apply_to_which_mode(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "methods options (only with" in text and "kernels options (only with `fastft bench kernels`)" in text
    assert "--fresh" in text and text.rindex("--family") > text.index("kernels options")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")
def test_cpu_memory_freed_by_an_earlier_run_does_not_hide_the_next_runs():
    """A row's CPU peak is its RSS above the RSS before its model: memory an earlier row freed stayed in the
    process and the next model reused it unseen (LoRA after full fine-tuning read 0.00 GiB). The release between
    rows hands it back to the OS."""
    from fastft.apps.bench.harness import PeakMemory

    earlier = [torch.ones(16 * 1024) for _ in range(4000)]   # 256 MB in 64 KB pieces: glibc's heap, not mmap
    survivor = torch.ones(16 * 1024)   # above them: the heap cannot shrink past it by itself
    del earlier
    run._release(torch.device("cpu"))
    meter = PeakMemory("cpu")
    with meter:
        this_run = [torch.ones(16 * 1024) for _ in range(2000)]   # 128 MB
    assert meter.peak_gib > 0.1, f"{meter.peak_gib:.3f} GiB measured for a 0.125 GiB run"
    del this_run, survivor


@pytest.mark.parametrize("memory_kind, panels", [("cpu peak RSS", 1), ("cuda max_memory_allocated", 2)])
def test_plot_labels_its_axis_and_leaves_out_cpu_memory(memory_kind, panels):
    row = dict(method="lora", peer="fastft", implementation="fastft", status="ok", tokens_per_s=1e3, peak_gib=0.5,
               memory_kind=memory_kind)
    config = dict(model=None, shape="tiny", batch_size=1, seq_len=8, dtype_resolved="fp32")
    fig = report.plot_figure({"rows": [row], "config": config, "environment": {"card": "cpu"}})
    assert len(fig.axes) == panels and fig.axes[-1].get_xlabel() == "fine-tuning method"
    assert [ax.get_ylabel() for ax in fig.axes][-1] == ("tokens/s" if panels == 1 else "peak memory (GiB)")


# --- fairness between fastft's rows and the peers' ----------------------------------------------------------------

def test_the_qlora_decode_buffer_is_released_before_the_next_row():
    """fastft QLoRA's shared decode buffer outlived its row and counted in the next row's (the peft+bnb peer's)
    peak memory: up to 112 MiB at the 8B shape."""
    from fastft.ops import qlora_path

    qlora_path._SCRATCH[(torch.device("cpu"), torch.bfloat16)] = torch.empty(1024, dtype=torch.bfloat16)
    run._release(torch.device("cpu"))
    assert not qlora_path._SCRATCH


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_peer_rows_drop_the_input_grad_hook_as_fastft_rows_do(method):
    """With gradient checkpointing peft hooks the embedding to require grad (backward work and, compiled, a graph
    break) where fastft's rows, checkpointing non-reentrantly, drop it: the peer now does the same work."""
    from fastft.apps.bench import peers
    from fastft.apps.bench.shapes import build_model
    from fastft.integration.methods import MethodOptions

    def build():
        return build_model(shape="tiny", seq_len=16, gradient_checkpointing=True)

    for implementation in ("peft", "fastft"):
        model, _ = peers.prepare(implementation, method, MethodOptions(rank=4, num_virtual_tokens=4), build,
                                 patch_model=False)
        embeddings = model.get_input_embeddings()(torch.tensor([[1, 2, 3]]))
        assert not embeddings.requires_grad, f"{implementation}: the input-grad hook is still on the embedding"


def test_compiled_runs_with_cuda_graphs_warm_up_past_the_recording():
    """A CUDA graph runs once unrecorded and is recorded on the second call: with --warmup 1 the recording fell in
    the first timed step."""
    cfg = BenchConfig(warmup=1)
    assert [run.warmup_steps(cfg, mode) for mode in ("off", "default", "reduce-overhead", "max-autotune",
                                                     "max-autotune-no-cudagraphs")] == [1, 1, 3, 3, 1]
    assert run.warmup_steps(BenchConfig(warmup=5), "reduce-overhead") == 5


def test_code_state_tells_uncommitted_edits_of_the_code_apart(tmp_path):
    """The provenance was `git rev-parse HEAD` alone: an edit-then-rerun (the usual workflow) resumed a table
    measured by other code. Edits to fastft/ (tracked or new files) now mark the commit dirty, with a digest of
    the edit; edits elsewhere (tests, docs) do not."""
    import subprocess

    from fastft.apps.provenance import code_state

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t", *args], check=True,
                       capture_output=True)

    (tmp_path / "fastft").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "fastft" / "op.py").write_text("x = 1\n")
    (tmp_path / "tests" / "test_op.py").write_text("y = 1\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "one")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert code_state(tmp_path) == head.strip()
    (tmp_path / "tests" / "test_op.py").write_text("y = 2\n")
    assert code_state(tmp_path) == head.strip()
    (tmp_path / "fastft" / "op.py").write_text("x = 2\n")
    first = code_state(tmp_path)
    (tmp_path / "fastft" / "op.py").write_text("x = 3\n")
    second = code_state(tmp_path)
    (tmp_path / "fastft" / "op.py").write_text("x = 1\n")
    (tmp_path / "fastft" / "new.py").write_text("z = 1\n")
    third = code_state(tmp_path)
    states = (first, second, third)
    assert len(set(states)) == 3 and all(state.startswith(head.strip() + "+dirty.") for state in states)
    (tmp_path / "fastft" / "new.py").unlink()
    assert code_state(tmp_path) == head.strip()


def test_the_first_row_is_not_charged_the_process_start_up():
    """On the CPU a row's memory is the RSS it adds: the first row of a process also paid autograd's, the
    optimizer's and the allocator's one-time state (~20 MiB, where the tiny shape's rows take ~3), fastft's in the
    default order. Run in a fresh process: in this one, earlier tests did that set-up already."""
    import os
    import subprocess
    import textwrap

    script = textwrap.dedent("""
        import torch
        from fastft.apps.bench import peers
        from fastft.apps.bench.config import BenchConfig
        from fastft.apps.bench.run import run_one
        cfg = BenchConfig(shape="tiny", steps=2, warmup=1, seq_len=32, batch_size=2, methods=("lora",),
                          peers=("peft",))
        peers.preload()
        print(*(run_one(cfg, "lora", impl, torch.device("cpu"))["peak_gib"] * 1024
                for impl in ("peft", "fastft", "peft", "fastft")))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    first, *rest = map(float, out.stdout.split()[-4:])
    assert first < max(rest) + 6, (first, rest)


def test_the_start_up_step_leaves_the_callers_random_streams_alone():
    from fastft.apps.bench import peers

    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    peers.preload()
    assert torch.equal(torch.rand(3), want)
