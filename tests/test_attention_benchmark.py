"""benchmarks/gpu_attention.py runs end to end in smoke mode (tests/benchmark_smoke.py)."""
from tests.benchmark_smoke import run_benchmark_smoke
from tests.utils import interpreter_only


@interpreter_only
def test_gpu_attention_benchmark_smoke(tmp_path):
    result, stdout = run_benchmark_smoke("gpu_attention.py", "attention.json", tmp_path)
    checks = [r for r in result["rows"] if r["section"] == "correctness"]
    assert checks and all(r["ok"] for r in checks), checks
    # checked where timed too: fastft against SDPA at each shape, the packed forward and backward against fp32
    kinds = {r["kernel"] for r in checks}
    assert {"packed output", "packed dq", "packed dk", "packed dv"} <= kinds, kinds
    assert any(k.endswith("output vs sdpa_flash") for k in kinds), kinds
    timed = {(r["section"], r.get("method"), r.get("layout")) for r in result["rows"] if "fwdbwd_ms" in r}
    assert ("dense", "fastft", None) in timed and ("packing", "fastft", "packed") in timed
    assert "### Packed vs padded" in stdout


def test_restricted_configs_keep_the_tuner_on_its_identity_cache(monkeypatch):
    """The verified configs replace the kernels' config functions with ones returning the same list every call:
    a new list per call missed the tuner's identity cache (~35 µs of host time inside each timing) and added a
    registry entry per call."""
    import torch

    import fastft.kernels.attention_bwd as kbwd
    import fastft.kernels.attention_fwd as kfwd
    from fastft.kernels import autotune
    from tests.benchmark_smoke import ROOT

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setattr(kfwd, "forward_configs", kfwd.forward_configs)  # restored after the test
    monkeypatch.setattr(kbwd, "backward_configs", kbwd.backward_configs)
    monkeypatch.setattr(autotune, "_REGISTRY", dict(autotune._REGISTRY))
    import gpu_attention

    good_fwd = [dict(c) for c in kfwd.forward_configs(torch.bfloat16, 128, True)[:2]]
    good_bwd = [dict(c) for c in kbwd.backward_configs(torch.bfloat16, 128, True)[:2]]
    gpu_attention.restrict_configs(good_fwd, good_bwd)
    assert kfwd.forward_configs(torch.bfloat16, 128, True) == good_fwd
    assert kbwd.backward_configs(torch.bfloat16, 128, True) == good_bwd
    assert kfwd.forward_configs(torch.bfloat16, 128, True) is kfwd.forward_configs(torch.float16, 64, False)
    first = autotune.tuner("attention_fwd", kfwd.forward_configs(torch.bfloat16, 128, True))
    size = len(autotune._REGISTRY)
    for _ in range(5):  # the timed calls' lookups: identity hits, nothing added
        assert autotune.tuner("attention_fwd", kfwd.forward_configs(torch.bfloat16, 128, True)) is first
    assert len(autotune._REGISTRY) == size


def test_results_are_written_after_each_shape(monkeypatch):
    """A run cut short (the section's cap) keeps the shapes it finished: the JSON is rewritten after the checks and
    after every shape, not only at the end."""
    from tests.benchmark_smoke import ROOT

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_attention

    saved = []

    def dense(shape, good_fwd, good_bwd):
        if shape == gpu_attention.SHAPES[1]:
            raise KeyboardInterrupt  # what the cap's SIGINT raises in the middle of the second shape
        gpu_attention.ROWS.append(dict(section="dense", shape=f"B{shape[0]}xS{shape[1]}", method="fastft"))
        return gpu_attention.ROWS[-1:]

    for name, value in dict(SMOKE=True, ROWS=[], check_configs=lambda: ([{}], [{}]), dense=dense,
                            write_results=lambda name, payload: saved.append([dict(r) for r in payload["rows"]]),
                            SHAPES=[(2, 40), (1, 72)]).items():
        monkeypatch.setattr(gpu_attention, name, value)
    try:
        gpu_attention.main()
    except KeyboardInterrupt:
        pass
    assert saved and saved[-1] == [dict(section="dense", shape="B2xS40", method="fastft")]


def test_the_backward_kernel_table_gives_each_kernels_share(monkeypatch, capsys):
    """gpu_attention's breakdown of the backward (CUDA only, so made-up rows here): a column a kernel, a missing one
    a dash, candidates marked, an error row kept."""
    from tests.benchmark_smoke import ROOT

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_attention

    rows = [dict(section="bwd_kernels", shape="B4xS2048", config="main", candidate=False,
                 kernels_ms={"_attn_bwd_delta_kernel": 0.02, "_attn_bwd_dkdv_kernel": 0.9,
                             "_attn_bwd_dq_kernel": 0.5}),
            dict(section="bwd_kernels", shape="B4xS2048", config="reduce", candidate=True,
                 kernels_ms={"_attn_bwd_delta_kernel": 0.02, "_attn_bwd_dkdv_kernel": 1.1, "torch": 0.11}),
            dict(section="bwd_kernels", shape="B1xS8192", config="reduce", candidate=True, error="RuntimeError: x")]
    monkeypatch.setattr(gpu_attention, "ROWS", rows)
    gpu_attention.print_backward_kernels()
    lines = capsys.readouterr().out.splitlines()
    assert "| B4xS2048 | main | 0.020 | 0.900 | 0.500 | — | 1.420 |" in lines
    assert "| B4xS2048 | reduce (candidate) | 0.020 | 1.100 | — | 0.110 | 1.230 |" in lines
    assert "| B1xS8192 | reduce (candidate) | — | — | — | — | — | RuntimeError: x" in lines
