"""`fastft train --compile` and `fastft bench --compile`: a compiled run trains what the eager run trains (same
seed, same losses), as one graph; its checkpoints keep the module names and resume in an eager run, and an eager
run's checkpoint resumes compiled; the knob is in --help; bad values stop with one line naming the option.

Backend aot_eager (dynamo + AOTAutograd, no code generation) keeps the CPU cost down; the documents all have the
same length, so every micro-batch has one shape and each run compiles once."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from fastft.apps.cli import main
from tests.train_utils import save_tiny_checkpoint

AOT = ["--compile", "default", "--compile-backend", "aot_eager"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    tiny = save_tiny_checkpoint(root / "tiny")
    data = root / "same.jsonl"  # documents of one token count: one packed shape, one compilation a run
    data.write_text("".join(json.dumps({"text": f"word{i % 7} and the other {i % 5} things go"}) + "\n"
                            for i in range(40)))
    # a constant learning rate: 2 steps, then --resume --steps 4, trains what 4 straight steps train
    common = ["train", "--model", str(tiny), "--data", str(data), "--batch-size", "3", "--eval-examples", "2",
              "--max-length", "24", "--lr", "3e-3", "--schedule", "constant", "--warmup-ratio", "0", "--seed", "1"]
    return root, common


def _train(setup, name, *extra) -> dict:
    root, common = setup
    assert main([*common, "--output-dir", str(root / name), *extra]) == 0
    return json.loads((root / name / "metrics.json").read_text())


def _resume(setup, source, name, *extra) -> dict:
    root, _ = setup
    shutil.copytree(root / source, root / name)
    shutil.rmtree(root / name / "adapter", ignore_errors=True)
    shutil.rmtree(root / name / "model", ignore_errors=True)
    return _train(setup, name, "--resume", *extra)


def _assert_compiled(metrics: dict, graph_breaks: int | None = 0):
    record = metrics["compile"]
    assert record["compiled"] and record["mode"] == "default" and record["backend"] == "aot_eager", record
    assert record["graphs"] >= 1, record  # dynamo compiled the training forward (it did not fall back to eager)
    assert record["recompile_limit_hits"] == 0, record  # nor did it give up recompiling part-way
    if graph_breaks is not None:
        assert record["graph_breaks"] == graph_breaks, record
    assert metrics["config"]["compile"] == "default" and metrics["config"]["compile_backend"] == "aot_eager"


def _weights(path) -> dict:
    return load_file(str(path))


def _assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys() and a
    assert not [k for k in a if "_orig_mod" in k]
    for key in a:  # Adam magnifies rounding in near-zero gradients: compared loosely
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key


@pytest.mark.slow
def test_compiled_lora_trains_like_eager_and_checkpoints_cross_over(setup):
    """LoRA with dropout: compiled 2 steps ≡ the first 2 of 4 eager steps; the compiled run's checkpoint resumes
    eagerly and the eager run's checkpoint resumes compiled, both to the 4 eager steps."""
    root, _ = setup
    lora = ["--method", "lora", "--dropout", "0.1", "--save-every", "2"]
    straight = _train(setup, "straight", *lora, "--steps", "4")
    assert straight["compile"] == {"compiled": False, "mode": "off", "backend": "inductor"}
    compiled = _train(setup, "compiled", *lora, "--steps", "2", *AOT)
    _assert_compiled(compiled)
    assert compiled["train_losses"] == pytest.approx(straight["train_losses"][:2], rel=1e-5)
    _train(setup, "eager", *lora, "--steps", "2")  # its checkpoint and adapter are compared below
    checkpoint = "checkpoints/step-00000002/trainable.safetensors"
    _assert_same_weights(_weights(root / "compiled" / checkpoint), _weights(root / "eager" / checkpoint))
    adapter = "adapter/adapter_model.safetensors"
    _assert_same_weights(_weights(root / "compiled" / adapter), _weights(root / "eager" / adapter))

    to_eager = _resume(setup, "compiled", "compiled-then-eager", *lora, "--steps", "4")
    to_compiled = _resume(setup, "eager", "eager-then-compiled", *lora, "--steps", "4", *AOT)
    assert not to_eager["compile"]["compiled"]
    _assert_compiled(to_compiled)
    for resumed, name in ((to_eager, "compiled-then-eager"), (to_compiled, "eager-then-compiled")):
        assert resumed["resumed_from"].endswith("step-00000002")
        assert resumed["train_losses"] == pytest.approx(straight["train_losses"], rel=1e-5), name
        _assert_same_weights(_weights(root / name / adapter), _weights(root / "straight" / adapter))


@pytest.mark.slow
def test_compiled_full_fine_tuning_trains_like_eager(setup):
    root, _ = setup
    full = ["--method", "full", "--steps", "2", "--lr", "1e-3"]
    eager = _train(setup, "full-eager", *full)
    compiled = _train(setup, "full-compiled", *full, *AOT)
    _assert_compiled(compiled)
    assert compiled["train_losses"] == pytest.approx(eager["train_losses"], rel=1e-5)
    _assert_same_weights(_weights(root / "full-compiled" / "model" / "model.safetensors"),
                         _weights(root / "full-eager" / "model" / "model.safetensors"))


@pytest.mark.slow
def test_compiled_training_with_fastft_attention_is_one_graph_like_eager(setup):
    """attn_implementation='fastft' traced whole in training: the packed rows (the collator's cu_seq_lens) run as
    one op, the mask function's in-graph packing probe adds no graph break, and the losses are eager's."""
    lora = ["--method", "lora", "--dropout", "0", "--steps", "2", "--attn-implementation", "fastft"]
    eager = _train(setup, "fastft-attention-eager", *lora)
    compiled = _train(setup, "fastft-attention-compiled", *lora, *AOT)
    _assert_compiled(compiled)
    assert compiled["train_losses"] == pytest.approx(eager["train_losses"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(os.environ.get("CXX") or "g++") is None, reason="inductor on the CPU needs g++")
def test_inductor_on_the_cpu_trains_like_eager(tmp_path):
    """The default backend end to end on the CPU: generated C++ kernels, the eager losses. IA³ on a 1-layer model:
    the smallest graph (~35 s of CPU with a cold inductor cache, most of this file's budget)."""
    tiny = save_tiny_checkpoint(tmp_path / "tiny", layers=1)
    data = tmp_path / "same.jsonl"
    data.write_text("".join(json.dumps({"text": f"word{i % 7} and the other {i % 5} things go"}) + "\n"
                            for i in range(12)))
    runs = {}
    for name, extra in (("eager", []), ("inductor", ["--compile", "default", "--compile-backend", "inductor"])):
        argv = ["train", "--model", str(tiny), "--data", str(data), "--method", "ia3", "--steps", "2", "--batch-size",
                "3", "--eval-examples", "0", "--max-length", "24", "--lr", "3e-3", "--output-dir", str(tmp_path / name)]
        assert main([*argv, *extra]) == 0
        runs[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    record = runs["inductor"]["compile"]
    assert record["compiled"] and record["backend"] == "inductor" and record["graphs"] >= 1, record
    assert runs["inductor"]["train_losses"] == pytest.approx(runs["eager"]["train_losses"], rel=1e-4)


def test_help_lists_the_compile_knobs(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    modes = "off,default,reduce-overhead,max-autotune,max-autotune-no-cudagraphs"
    for words in ("--compile", "--compile-backend", modes,
                  "inductor,aot_eager,eager", "torch.compile the training forward and backward", "(default: off)"):
        assert words in text, words


@pytest.mark.parametrize("argv, message", [
    (["--compile", "fast"], "argument --compile: invalid choice: 'fast'"),
    (["--compile", "default", "--compile-backend", "tvm"], "argument --compile-backend: invalid choice: 'tvm'"),
    (["--compile", "max-autotune", "--compile-backend", "aot_eager"],
     "--compile max-autotune is a mode of the inductor backend; --compile-backend aot_eager has no modes"),
    (["--compile", "reduce-overhead"],  # the default --dropout 0.05 with LoRA
     "--compile reduce-overhead captures CUDA graphs, which would replay the fused LoRA ops' dropout seed"),
    (["--compile", "max-autotune", "--method", "dora"],
     "use --dropout 0 with --method dora (got --dropout 0.05), or --compile default or max-autotune-no-cudagraphs"),
])
def test_bad_compile_settings_name_the_option(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_compile_settings_from_yaml_are_checked(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("compile: fast\n")
    with pytest.raises(SystemExit):
        main(["train", "--config", str(config)])
    err = capsys.readouterr().err
    assert "key 'compile' must be one of off, default, reduce-overhead, max-autotune" in err and "'fast'" in err


def test_reduce_overhead_without_dropout_or_with_other_methods_is_accepted():
    from fastft.apps.compiling import compile_problem

    assert compile_problem("reduce-overhead", "inductor", cuda=True, dropout=0.0, methods=("lora",)) is None
    assert compile_problem("reduce-overhead", "inductor", cuda=True, dropout=0.1, methods=("ia3",)) is None
    assert "use --dropout 0 with --method dora (got --dropout 0.1)" in compile_problem(
        "reduce-overhead", "inductor", cuda=True, dropout=0.1, methods=("dora",))
    assert compile_problem("off", "inductor", cuda=False, dropout=0.1, methods=("lora",)) is None
    assert compile_problem("max-autotune-no-cudagraphs", "inductor", cuda=True, dropout=0.1,
                           methods=("lora",)) is None


def test_inductor_on_the_cpu_needs_a_cxx_compiler(monkeypatch):
    from fastft.apps.compiling import compile_problem

    monkeypatch.setenv("CXX", "no-such-compiler-here")
    problem = compile_problem("default", "inductor", cuda=False)
    assert "needs a C++ compiler, and 'no-such-compiler-here' is not on PATH" in problem
    assert compile_problem("default", "aot_eager", cuda=False) is None
    assert compile_problem("default", "inductor", cuda=True) is None  # inductor writes Triton on a GPU


# ------------------------------------------------------------------------------------------------ fastft bench

@pytest.mark.slow
def test_bench_times_each_run_eager_and_compiled(tmp_path):
    from fastft.apps.bench.report import markdown

    argv = ["bench", "--shape", "tiny", "--steps", "1", "--warmup", "1", "--seq-len", "16", "--batch-size", "1",
            "--methods", "lora", "--peers", "none", "--formats", "json", "md", "--output-dir", str(tmp_path), *AOT]
    assert main(argv) == 0
    result = json.loads((tmp_path / "bench_methods.json").read_text())
    eager, compiled = result["rows"]
    assert eager["compile"] == "off" and "compile_backend" not in eager
    assert compiled["compile"] == "default" and compiled["compile_backend"] == "aot_eager"
    assert eager["status"] == compiled["status"] == "ok", (eager, compiled)
    # the same seeded model and tokens: the compiled steps compute the eager steps' losses
    assert compiled["loss_first"] == pytest.approx(eager["loss_first"], rel=1e-5)
    assert compiled["loss_last"] == pytest.approx(eager["loss_last"], rel=1e-5)
    assert result["config"]["compile"] == "default" and result["config"]["compile_backend"] == "aot_eager"
    table = (tmp_path / "bench_methods.md").read_text()
    assert table == markdown(result) and "| status | compile |" in table
    assert "| lora | fastft | ok | off |" in table and "| lora | fastft | ok | default (aot_eager) |" in table


def test_bench_report_compares_compiled_rows_with_compiled_peers():
    """× peer pairs a compiled row with the peer's compiled row; eager rows sort before compiled ones; the plot
    draws compiled runs as their own bars; results written before the option (no field) read as eager."""
    from fastft.apps.bench.report import plot_png, table_rows

    def row(impl, compile, tps):
        return {"method": "lora", "implementation": impl, "peer": impl, "status": "ok", "tokens_per_s": tps,
                "step_ms": 1.0, "peak_gib": 1.0, "trainable_params": 1, "memory_kind": "cuda allocated",
                **({} if compile is None else {"compile": compile, "compile_backend": "inductor"})}

    result = {"environment": {"card": "H200", "versions": {}}, "rows": [
        row("fastft", "default", 300.0), row("peft", "default", 150.0), row("fastft", None, 200.0),
        row("peft", None, 100.0)],
        "config": {"model": None, "shape": "tiny", "batch_size": 1, "seq_len": 8, "dtype_resolved": "bf16"}}
    rows = table_rows(result)
    assert [(r["implementation"], r["compile"]) for r in rows] == [
        ("fastft", "off"), ("fastft", "default (inductor)"), ("peft", "off"), ("peft", "default (inductor)")]
    assert rows[0]["× peer tokens/s"] == "2.00" and rows[1]["× peer tokens/s"] == "2.00"
    assert plot_png(result)[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ on a GPU (never run in this CPU-only session)

@pytest.mark.gpu
@pytest.mark.parametrize("mode,attention", [("default", "sdpa"), ("reduce-overhead", "sdpa"),
                                            ("reduce-overhead", "fastft")])
def test_compiled_training_on_gpu_tracks_eager(setup, mode, attention):
    """Inductor's Triton code (and CUDA graphs with reduce-overhead, dropout 0) on bf16 fused LoRA: the eager
    run's losses within bf16 rounding, and the adapter learns the same. With attn_implementation='fastft' the
    packed rows run the varlen kernels, and the mask function's in-graph packing probe is a graph output kept
    between replays (_packing_seen)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    lora = ["--method", "lora", "--dropout", "0", "--steps", "4", "--attn-implementation", attention]
    eager = _train(setup, f"gpu-eager-{mode}-{attention}", *lora)
    compiled = _train(setup, f"gpu-{mode}-{attention}", *lora, "--compile", mode, "--compile-backend", "inductor")
    assert compiled["device"].startswith("cuda") and compiled["compile"]["compiled"]
    assert compiled["compile"]["mode"] == mode and compiled["compile"]["graphs"] >= 1
    assert compiled["train_losses"] == pytest.approx(eager["train_losses"], rel=2e-2)
    assert compiled["eval_after"]["loss"] == pytest.approx(eager["eval_after"]["loss"], rel=2e-2)


@pytest.mark.gpu
def test_bench_compiled_rows_on_gpu(tmp_path):
    """reduce-overhead (CUDA graphs) in the bench: the compiled rows run and compute the eager rows' losses."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    argv = ["bench", "--shape", "tiny", "--steps", "3", "--warmup", "2", "--seq-len", "64", "--batch-size", "2",
            "--methods", "lora,full", "--peers", "peft", "--formats", "json", "--output-dir", str(tmp_path),
            "--compile", "reduce-overhead"]
    assert main(argv) == 0
    rows = json.loads((tmp_path / "bench_methods.json").read_text())["rows"]
    by = {(r["method"], r["peer"], r["compile"]): r for r in rows}
    for method in ("lora", "full"):
        for peer in ("fastft", "peft"):
            eager, compiled = by[(method, peer, "off")], by[(method, peer, "reduce-overhead")]
            assert eager["status"] == compiled["status"] == "ok", (eager, compiled)
            assert compiled["loss_first"] == pytest.approx(eager["loss_first"], rel=2e-2)


@pytest.mark.slow
def test_compiled_training_on_bucketed_batches_trains_like_eager(setup, tmp_path):
    """--pad-to-buckets under --compile: documents of many lengths, padded to a few shapes, compile without graph
    breaks and train what the eager unpadded run trains (a small --lr: Adam turns rounding-level gradient
    differences into ±lr steps)."""
    root, common = setup
    data = tmp_path / "ragged.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(f"word{j % 11}" for j in range(3 + (7 * i) % 17))}) + "\n"
                            for i in range(40)))
    ragged = [a if a != str(root / "same.jsonl") else str(data) for a in common]
    runs = {}
    for name, extra in (("eager", ["--pad-to-buckets", "off"]), ("compiled", ["--pad-to-buckets", "on", *AOT])):
        out = tmp_path / name
        assert main([*ragged, "--method", "lora", "--dropout", "0", "--steps", "3", "--lr", "1e-5",
                     "--output-dir", str(out), *extra]) == 0
        runs[name] = json.loads((out / "metrics.json").read_text())
    _assert_compiled(runs["compiled"])
    assert runs["compiled"]["config"]["pad_to_buckets"] == "on"
    assert runs["compiled"]["train_losses"] == pytest.approx(runs["eager"]["train_losses"], rel=1e-5)
