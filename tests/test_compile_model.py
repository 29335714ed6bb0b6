"""A whole LoRA training step of a patched model under torch.compile(fullgraph=True): a tiny Llama through
fastft.patch_model (norms, RoPE, GLU MLP, fused attention, fused loss) with fastft's peft LoRA layers, every fused op
a fastft:: custom op in one graph, the loss and every trainable gradient equal to eager's (the same kernels run;
Triton through the interpreter on CPU)."""
import pytest
import torch

from tests.utils import interpreter_only, randomize_lora_B, tiny_llama


@interpreter_only
@pytest.mark.parametrize("batch,dynamic", [(2, None), (1, True)])  # batch 1: no packing check reading values;
def test_patched_lora_llama_training_step_compiles_whole(monkeypatch, batch, dynamic):  # dynamic: symbolic floats
    from peft import LoraConfig
    from torch._dynamo.backends.debugging import aot_eager

    import fastft
    from fastft.integration.attention import register_attention
    from fastft.integration.peft_lora import get_peft_model

    monkeypatch.setenv("FASTFT_LORA_BACKEND", "triton")
    register_attention("triton")
    try:
        model = tiny_llama(num_hidden_layers=1, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                           num_key_value_heads=1).train()  # the patched forward fuses the loss in training mode
        fastft.patch_model(model, backend="triton")
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
        randomize_lora_B(model)
        ids = torch.randint(0, 128, (batch, 5))
        params = [p for p in model.parameters() if p.requires_grad]

        def step(forward):
            loss = forward(ids)
            return [loss.detach(), *torch.autograd.grad(loss, params)]

        graphs = []

        def backend(gm, example_inputs):
            graphs.append(gm.code)
            return aot_eager(gm, example_inputs)

        torch._dynamo.reset()
        forward = lambda ids: model(input_ids=ids, labels=ids).loss  # noqa: E731
        want = step(forward)
        got = step(torch.compile(forward, backend=backend, fullgraph=True, dynamic=dynamic))
    finally:
        register_attention("auto")
    code = "\n".join(graphs)
    for op in ("rms_norm", "rope", "glu", "flash_attention", "lora_linear", "linear_loss"):
        assert f"torch.ops.fastft.{op}." in code, f"fastft::{op} is not in the step's graph"
    assert len(got) == len(want) == 1 + 2 * 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=0, rtol=0)


@interpreter_only
def test_batch_one_of_changing_length_compiles_at_most_twice():
    """One row (B == 1) builds its documents' cu_seqlens in the graph; their last entry (the length S) was given to
    F.pad as a number, so dynamo specialised on S: a graph per length until the recompile limit (fullgraph: a hard
    failure at the 9th length). Now two graphs (static, then dynamic) serve every length, plain or packed rows
    (position_ids restarting), with eager's losses."""
    from torch._dynamo.backends.debugging import aot_eager

    import fastft
    from fastft.integration.attention import register_attention

    register_attention("triton")
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(1)
        return aot_eager(gm, example_inputs)

    try:
        model = tiny_llama(num_hidden_layers=1, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                           num_key_value_heads=1).train()
        fastft.patch_model(model, backend="triton")

        def forward(ids, position_ids):
            return model(input_ids=ids, position_ids=position_ids, labels=ids).loss

        torch._dynamo.reset()
        compiled = torch.compile(forward, backend=backend, fullgraph=True)
        with torch.no_grad():
            for S in range(4, 10):
                ids = torch.randint(0, 128, (1, S), generator=torch.Generator().manual_seed(S))
                cut = S // 2 if S % 2 else S  # odd lengths: two packed documents
                position_ids = torch.cat([torch.arange(cut), torch.arange(S - cut)])[None]
                torch.testing.assert_close(compiled(ids, position_ids), forward(ids, position_ids), atol=0, rtol=0)
    finally:
        register_attention("auto")
    assert len(graphs) <= 2, f"{len(graphs)} graphs for 6 lengths"
