"""--compile max-autotune captures CUDA graphs as reduce-overhead does, so with dropout on a fused LoRA-family method
it is refused up front (the graph would replay one dropout mask every step). Mutation run 18: dropping max-autotune
from the CUDA-graph modes was caught only by `fastft train` starting a real run; this asks compile_problem."""
from fastft.apps.compiling import compile_problem


def test_max_autotune_with_lora_dropout_is_refused():
    problem = compile_problem("max-autotune", "inductor", cuda=True, dropout=0.1, methods=("lora",))
    assert problem is not None and "--compile max-autotune captures CUDA graphs" in problem
    assert compile_problem("max-autotune", "inductor", cuda=True, dropout=0.0, methods=("lora",)) is None
