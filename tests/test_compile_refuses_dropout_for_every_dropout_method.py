"""compile_problem refuses dropout under CUDA-graph modes for each method whose fused ops draw the seed on the host
(lora, qlora and dora), not lora alone (mutation CO4: dora dropped from DROPOUT_METHODS survived)."""
import pytest

from fastft.apps.compiling import compile_problem


@pytest.mark.parametrize("method", ["lora", "qlora", "dora"])
@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_cuda_graph_modes_refuse_dropout_per_method(mode, method):
    problem = compile_problem(mode, "inductor", cuda=True, dropout=0.1, methods=(method,))
    assert problem is not None and f"--method {method}" in problem and "--dropout 0" in problem
    assert compile_problem(mode, "inductor", cuda=True, dropout=0.0, methods=(method,)) is None
    assert compile_problem("default", "inductor", cuda=True, dropout=0.1, methods=(method,)) is None
