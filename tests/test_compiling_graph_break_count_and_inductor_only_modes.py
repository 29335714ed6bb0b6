"""fastft.apps.compiling, past what the train/bench tests pin: `dynamo_counts()["graph_breaks"]` counts breaks,
not distinct break reasons (a frame that breaks twice at the same call is two breaks), and every mode other than
"default" (max-autotune-no-cudagraphs too, not only the CUDA-graph ones) is refused with a backend other than
inductor, which has no modes."""
import pytest
import torch

from fastft.apps.compiling import COMPILE_BACKENDS, COMPILE_MODES, compile_problem, dynamo_counts


def test_graph_breaks_count_every_break_not_every_reason():
    def f(x):
        x = x + 1
        torch._dynamo.graph_break()
        x = x * 2
        torch._dynamo.graph_break()       # the same reason again
        return x - 1

    torch._dynamo.reset()
    compiled = torch.compile(f, backend="eager")
    before = dynamo_counts()
    assert torch.equal(compiled(torch.ones(3)), f(torch.ones(3)))
    after = dynamo_counts()
    assert after["graph_breaks"] - before["graph_breaks"] == 2
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", [m for m in COMPILE_MODES if m not in ("off", "default")])
@pytest.mark.parametrize("backend", [b for b in COMPILE_BACKENDS if b != "inductor"])
def test_modes_are_inductors_alone(mode, backend):
    problem = compile_problem(mode, backend, cuda=True)
    assert problem is not None and problem.startswith(f"--compile {mode} is a mode of the inductor backend"), problem
    assert compile_problem("default", backend, cuda=True) is None
    assert compile_problem(mode, "inductor", cuda=True) is None
