"""A bare `fastft bench` on the CPU times the default GPU-sized shape (llama-1b): hours of runs with no word about
it. It now notes the tiny shape's command first; a --shape or --model given on purpose, or a CUDA device, gets no
note."""
import pytest
import torch

from fastft.apps import cli
from fastft.apps.bench import command as bench_command


def _note(argv, device="cpu"):
    parser, _ = cli._parser()
    args = parser.parse_args(argv)
    return bench_command._cpu_scale_note(args, argv, bench_command.config_from_args(args), torch.device(device))


def test_a_bare_bench_on_the_cpu_notes_the_tiny_shape():
    note = _note(["bench"])
    assert note.startswith("note: --shape llama-1b (the default) on the CPU")
    assert "--shape tiny" in note


@pytest.mark.parametrize("argv, device", [
    (["bench", "--shape", "llama-1b"], "cpu"),          # asked for on purpose
    (["bench", "--shape", "tiny"], "cpu"),
    (["bench", "--model", "smollm2-135m"], "cpu"),
    (["bench"], "cuda"),
])
def test_no_note_where_the_shape_was_chosen_or_a_gpu_runs_it(argv, device):
    assert _note(argv, device) is None


def test_run_bench_prints_the_note_before_any_run(tmp_path, monkeypatch, capsys):
    class Stop(Exception):
        pass

    def stop(*_args, **_kwargs):
        raise Stop

    monkeypatch.setattr("fastft.apps.bench.methods.default_device", lambda: torch.device("cpu"))
    monkeypatch.setattr("fastft.apps.bench.methods.bench_methods", stop)
    argv = ["bench", "--output-dir", str(tmp_path / "out")]
    parser, _ = cli._parser()
    with pytest.raises(Stop):
        bench_command.run_bench(parser.parse_args(argv), argv)
    assert "note: --shape llama-1b (the default) on the CPU" in capsys.readouterr().out
