"""`fastft bench`: the tiny-shape method table on the CPU writes its JSON, markdown table and PNG plot; failures
become rows, never crashes or numbers; the CLI's help and errors; the targets check."""
import dataclasses
import json

import pytest
import torch

from fastft.apps import cli
from fastft.apps.bench import command as bench_command
from fastft.apps.bench import peers, run
from fastft.apps.bench.config import BenchConfig
from fastft.apps.bench.methods import planned_runs
from fastft.apps.bench.targets import check_targets
from fastft.integration.methods import METHODS

STATUSES = {"ok", "unavailable", "not installed", "error", "oom"}
TINY = ["--shape", "tiny", "--steps", "2", "--warmup", "1", "--seq-len", "32", "--batch-size", "2"]


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    assert cli.main(["bench", *TINY, "--output-dir", str(out)]) == 0
    return out


def test_tiny_bench_rows(tiny_bench):
    result = json.loads((tiny_bench / "bench_methods.json").read_text())
    rows = {(r["method"], r["implementation"]): r for r in result["rows"]}
    assert {r["method"] for r in result["rows"]} == set(METHODS)
    assert all(r["status"] in STATUSES for r in result["rows"])
    failed = [r for r in result["rows"] if r["status"] in ("error", "oom")]
    assert not failed, [(r["method"], r["implementation"], r.get("error"), r.get("traceback")) for r in failed]
    for key in [("lora", "fastft"), ("lora", "peft"), ("qlora", "fastft"), ("qlora", "peft+bnb"), ("full", "fastft")]:
        r = rows[key]
        assert r["status"] == "ok", r
        assert r["tokens_per_s"] > 0 and r["step_ms"] > 0 and len(r["step_ms_all"]) == 2
        assert r["tokens_per_s"] == pytest.approx(2 * 32 / (r["step_ms"] / 1e3))
        assert r["peak_gib"] >= 0 and r["memory_kind"].startswith("cpu")
        assert r["loss_first"] == r["loss_first"]  # finite, not NaN
    # LoRA r=16 on the 7 linears of 2 tiny layers, the same count whoever builds it; full trains everything
    lora = 2 * 16 * (2 * (64 + 64) + 2 * (64 + 32) + 2 * (64 + 128) + (128 + 64))
    assert rows[("lora", "fastft")]["trainable_params"] == rows[("lora", "peft")]["trainable_params"] == lora
    assert rows[("qlora", "peft+bnb")]["quantized_by"] == "bitsandbytes nf4"
    assert rows[("full", "fastft")]["trainable_params"] == 512 * 64 + 2 * (3 * 64 * 64 + 3 * 64 * 128 + 128) + 64
    # every method measured by fastft (patched) and by its plain peer wherever peft has the method, same method
    # size either way
    plain_peer = {"qlora": "peft+bnb", "full": "transformers"}
    for method in METHODS:
        ours = rows[(method, "fastft")]
        assert ours["status"] == "ok" and ours["tokens_per_s"] > 0 and ours["patched"], ours
        if method != "adapter":
            peer = rows[(method, plain_peer.get(method, "peft"))]
            assert peer["status"] == "ok" and peer["tokens_per_s"] > 0, peer
            assert peer["trainable_params"] == ours["trainable_params"], (method, peer, ours)
    # rows without a measurement carry the reason and no number
    assert rows[("adapter", "peft")]["status"] == "unavailable" and "peft has no" in rows[("adapter", "peft")]["reason"]
    for r in result["rows"]:
        if r["status"] != "ok":
            assert (r.get("reason") or r.get("error")) and "tokens_per_s" not in r, r
    env = result["environment"]
    assert env["card"].startswith("cpu")   # "cpu (<its model>)": a table resumed on another CPU is refused
    assert env["versions"]["torch"] == torch.__version__ and env["versions"]["peft"]
    assert result["config"]["shape"] == "tiny" and result["config"]["dtype_resolved"] == "fp32"


def test_tiny_bench_table_and_plot(tiny_bench):
    table = (tiny_bench / "bench_methods.md").read_text()
    assert "| lora | fastft | ok |" in table and "| lora | peft | ok |" in table
    assert "| adapter | peft | unavailable |" in table
    assert "cpu peak RSS" in table and "not checked" in table  # memory kind named; targets not claimed
    png = (tiny_bench / "bench_methods.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert not list(tiny_bench.glob(".*.tmp-*"))


def test_report_redrawn_from_json(tiny_bench, tmp_path):
    from fastft.apps.bench import report

    assert report.main([str(tiny_bench / "bench_methods.json"), str(tmp_path)]) == 0
    assert (tmp_path / "bench_methods.md").read_text() == (tiny_bench / "bench_methods.md").read_text()
    assert (tmp_path / "bench_methods.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (tmp_path / "bench_methods.json").exists()


def test_not_implemented_and_failures_become_rows(monkeypatch):
    cfg = BenchConfig(shape="tiny", steps=1, warmup=1, seq_len=8, batch_size=1)
    cpu = torch.device("cpu")

    def fail(exc):
        def prepare(*args, **kwargs):
            raise exc
        return prepare

    monkeypatch.setattr(peers, "prepare", fail(NotImplementedError("method 'x' has no fastft room yet")))
    row = run.run_one(cfg, "dora", "fastft", cpu)
    assert row["status"] == "unavailable" and row["reason"] == "method 'x' has no fastft room yet"
    assert "tokens_per_s" not in row
    monkeypatch.setattr(peers, "prepare", fail(RuntimeError("boom\nsecond line")))
    row = run.run_one(cfg, "lora", "fastft", cpu)
    assert row["status"] == "error" and row["error"] == "RuntimeError: boom" and "tokens_per_s" not in row
    monkeypatch.setattr(peers, "missing_package", lambda impl, method: "liger_kernel")
    row = run.run_one(cfg, "lora", "liger", cpu)
    assert row == {"method": "lora", "implementation": "peft+liger", "peer": "liger", "compile": "off",
                   "status": "not installed", "reason": "liger_kernel is not installed"}


def test_help_lists_every_knob(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    flags = {f.name: "--" + f.name.replace("_", "-") for f in dataclasses.fields(BenchConfig)}
    flags["patch_model"] = "--no-patch-model"
    for flag in (*flags.values(), "--family", "--fresh", "kernels"):
        assert flag in text, flag
    assert "llama-1b" in text and "llama-8b" in text and "tiny" in text and "(default: 2048)" in text
    lr_help = text[text.index("\n  --lr LR"):text.index("\n  --seed")]
    assert "learning rate" in lr_help and "(default: 1e-05)" in " ".join(lr_help.split())


def test_lr_flag_sets_the_runs_learning_rate():
    parser, _ = cli._parser()
    assert bench_command.config_from_args(parser.parse_args(["bench", "--lr", "3e-4"])).lr == 3e-4
    assert bench_command.config_from_args(parser.parse_args(["bench"])).lr == BenchConfig().lr


@pytest.fixture
def nothing_runs(monkeypatch):
    from fastft.apps.bench import kernels, methods

    monkeypatch.setattr(methods, "bench_methods", lambda *a, **k: pytest.fail("a table run started"))
    monkeypatch.setattr(kernels, "run_kernels", lambda *a, **k: pytest.fail("a kernel benchmark started"))


@pytest.mark.parametrize("argv, flag", [
    (["kernels", "--shape", "llama-1b", "--steps", "6"], "--shape"),   # the defaults: given all the same
    (["kernels", "--steps", "6"], "--steps"),
    (["kernels", "--lr", "1e-5"], "--lr"),
    (["kernels", "--methods", ",".join(METHODS)], "--methods"),
    (["kernels", "--compile", "off"], "--compile"),
    (["kernels", "--see", "0"], "--seed"),                             # an abbreviation argparse accepts
    (["--family", "all"], "--family"),
    (["methods", "--shape", "tiny", "--family", "all"], "--family"),
])
def test_the_other_modes_flags_are_refused_at_any_value(capsys, nothing_runs, argv, flag):
    assert cli.main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"fastft bench: error: {flag} applies to"), err


def test_a_modes_own_flags_and_a_value_spelled_like_the_command_pass(monkeypatch, tmp_path):
    from fastft.apps.bench import kernels

    calls = []
    monkeypatch.setattr(kernels, "run_kernels", lambda families, out: calls.append((families, out)) or 0)
    out = str(tmp_path / "bench")
    assert cli.main(["bench", "kernels", "--family", "all", "--output-dir", out]) == 0
    assert calls == [(list(kernels.FAMILIES), out)]


@pytest.mark.parametrize("argv, names", [(["--methods", "lora,foo"], ["'foo'", *METHODS]),
                                          (["--peers", "bar"], ["'bar'", "peft", "liger", "unsloth"]),
                                          (["--peers", "none,peft"], ["none means fastft alone", "none,peft"]),
                                          (["--steps", "0"], ["--steps"]),
                                          (["--formats", "json,pdf"], ["'pdf'", "json, md, png"]),
                                          (["--compile", "default", "--warmup", "0"],
                                           ["--compile default", "--warmup"]),
                                          (["--compile", "max-autotune", "--compile-backend", "eager"],
                                           ["--compile max-autotune", "--compile-backend eager"])])
def test_bad_flags_one_line_error(capsys, nothing_runs, argv, names):
    assert cli.main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fastft bench: error:")
    assert all(n in err for n in names), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU message")
def test_kernels_on_cpu_says_so(capsys, tmp_path):
    """An error (exit 2, one line on stderr): exit 0 let a script read "nothing was timed" as a success."""
    assert cli.main(["bench", "kernels", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fastft bench: error:") and "need a CUDA GPU" in err
    assert not list(tmp_path.iterdir())


def _result(rows, **config):
    cfg = dict(shape="llama-1b", model=None, batch_size=4, seq_len=2048, gradient_checkpointing=False,
               dtype_resolved="bf16", device="cuda", rank=16, alpha=32.0, num_virtual_tokens=32, patch_model=True,
               warmup=2)
    cfg.update(config)
    full = [dict(method=m, peer=p, status="ok", tokens_per_s=t, peak_gib=g, step_ms=4 * 2048 / t * 1e3)
            for m, p, t, g in rows]
    return {"config": cfg, "environment": {"card": "NVIDIA H200"}, "rows": full}


def test_targets_check():
    lines = check_targets(_result([("lora", "fastft", 95e3, 14.0), ("qlora", "fastft", 70e3, 11.0),
                                   ("dora", "fastft", 40e3, 30.0), ("dora", "peft", 24.5e3, 52.8),
                                   ("ia3", "fastft", 60e3, 20.0), ("ia3", "peft", 55e3, 29.6),
                                   ("full", "fastft", 61e3, 33.0)]))
    text = "\n".join(lines)
    assert "lora ≥ 90k" in lines[0] and lines[0].endswith("**met**")
    assert lines[1].endswith("**missed**")                        # qlora below 80k
    assert "dora" in lines[2] and "1.63×" in lines[2] and lines[2].endswith("**met**")
    assert "prefix" in lines[3] and "not measured" in lines[3]
    assert "ia3" in lines[5] and lines[5].endswith("**missed**")   # 1.09×
    assert "LoRA step faster" in lines[6] and lines[6].endswith("**met**")
    assert "H200 targets" not in text
    eight = _result([("qlora", "fastft", 12e3, 5.0), ("qlora", "peft", 4.17e3, 9.8)], shape="llama-8b",
                    batch_size=1, gradient_checkpointing=True)
    assert check_targets(eight)[0].endswith("**met**")
    assert check_targets(_result([], dtype_resolved="fp32", device="cpu"))[0].startswith("- not checked")


def test_process_wide_patchers_run_last():
    runs = planned_runs(BenchConfig(methods=("lora", "full"), peers=("unsloth", "liger", "peft")))
    assert runs == [("lora", "fastft"), ("lora", "peft"), ("full", "fastft"), ("full", "peft"),
                    ("lora", "liger"), ("full", "liger"), ("lora", "unsloth"), ("full", "unsloth")]
    assert planned_runs(BenchConfig(methods=("qlora",), peers=())) == [("qlora", "fastft")]


@pytest.mark.gpu
def test_tiny_bench_on_gpu(tmp_path):
    """The table on CUDA: bf16, fused kernels, CUDA peak memory; LoRA and QLoRA beside peft / peft+bnb."""
    argv = ["bench", "--shape", "tiny", "--steps", "2", "--warmup", "1", "--seq-len", "64", "--batch-size", "2",
            "--methods", "lora,qlora,full", "--peers", "peft", "--output-dir", str(tmp_path)]
    assert cli.main(argv) == 0
    result = json.loads((tmp_path / "bench_methods.json").read_text())
    assert result["config"]["dtype_resolved"] == "bf16" and result["environment"]["card"] != "cpu"
    for r in result["rows"]:
        if (r["method"], r["implementation"]) in {("lora", "fastft"), ("lora", "peft"), ("qlora", "fastft"),
                                                  ("full", "fastft")}:
            assert r["status"] == "ok", r
            assert r["tokens_per_s"] > 0 and r["peak_gib"] > 0 and r["memory_kind"].startswith("cuda")
    assert (tmp_path / "bench_methods.png").read_bytes()[:4] == b"\x89PNG"


def test_rows_per_shape_reports_a_failing_shape_and_measures_the_rest(capsys):
    from fastft.apps.bench import rows_per_shape

    def bench_shape(k, n):
        if k == 2:
            raise RuntimeError("out of memory")
        return [dict(shape=f"{k}->{n}", method="m", ms=float(k))]

    rows = rows_per_shape([(1, 4), (2, 4), (3, 4)], bench_shape, ["shape", "method", "ms"])
    assert [r["shape"] for r in rows] == ["1->4", "2->4", "3->4"]
    assert rows[1]["method"] == "FAILED: RuntimeError: out of memory" and rows[2]["ms"] == 3.0
    assert capsys.readouterr().out.count("| shape |") == 3  # each shape's table printed as it finishes


def test_bench_runs_every_row_with_the_optimizer_asked(tmp_path, monkeypatch):
    """--optimizer adamw-8bit: the fastft and peft full fine-tuning rows both step bitsandbytes' 8-bit AdamW (the
    same optimizer on every row), and the table says which."""
    pytest.importorskip("bitsandbytes")
    from fastft.apps import optimizers

    made = []
    real = optimizers.make_optimizer

    def recording(name, model, **kwargs):
        optimizer = real(name, model, **kwargs)
        made.append(type(optimizer).__name__)
        return optimizer

    monkeypatch.setattr(run, "make_optimizer", recording)
    out = tmp_path / "bench"
    assert cli.main(["bench", *TINY, "--methods", "full", "--peers", "peft", "--optimizer", "adamw-8bit",
                     "--output-dir", str(out)]) == 0
    result = json.loads((out / "bench_methods.json").read_text())
    assert result["config"]["optimizer"] == "adamw-8bit"
    assert [r["status"] for r in result["rows"]] == ["ok", "ok"]
    assert made == ["AdamW8bitGroupBits"] * 2
    assert "optimizer adamw-8bit for every row" in (out / "bench_methods.md").read_text()
