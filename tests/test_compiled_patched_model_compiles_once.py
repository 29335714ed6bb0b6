"""A patched model under torch.compile compiled twice: the fastft mask function wrote process-wide notes (the causal
mask's window, the packed documents it found) at every traced forward, and dynamo's guards on those dicts failed at
the second call (in `fastft bench --compile --warmup 1`, inside the first timed step). A note that changes nothing
is no longer written while tracing."""
import torch
from peft import LoraConfig

import fastft
from tests.utils import graphs_per_training_call, tiny_llama


def test_three_compiled_training_steps_compile_one_graph():
    torch._dynamo.reset()
    model = fastft.patch_model(fastft.get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"])))
    model.train()
    compiled = torch.compile(model, backend="eager")
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    graphs = graphs_per_training_call(compiled, ids)
    assert graphs == [1, 0, 0], graphs


def test_a_second_patched_model_reuses_the_first_ones_compiled_graph():
    """patch_model wrapped the attention forward anew at every call: a new attention class per patched model, so each
    one compiled again and, past dynamo's recompile limit (8), the next patched model ran eagerly, silently."""
    torch._dynamo.reset()
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    graphs = []
    for _ in range(2):
        model = fastft.patch_model(tiny_llama(), attention=False)  # fastft attention keys its notes per model
        graphs.append(graphs_per_training_call(torch.compile(model.train(), backend="eager"), ids, calls=1)[0])
    assert graphs == [1, 0], graphs
