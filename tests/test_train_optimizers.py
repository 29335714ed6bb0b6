"""--optimizer: bitsandbytes' 8-bit AdamW (its state a quarter of torch's) against torch's AdamW, end to end in
`fastft train` with a resume, and the settings it cannot run with."""
import json

import pytest
import torch
from safetensors.torch import load_file

from fastft.apps.cli import main
from fastft.apps.training.config import ConfigError, TrainConfig, validate
from fastft.apps.optimizers import make_optimizer, parameter_groups
from tests import train_utils
from tests.utils import tiny_llama

tiny, one_thread = train_utils.tiny, train_utils.one_thread  # the shared fixtures

pytest.importorskip("bitsandbytes")


def _state_bytes(optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor) and v.dim() > 0 and v.numel() > 256)  # not qmaps


def _steps(optimizer, params, grads):
    for g in grads:
        for p, gp in zip(params, g):
            p.grad = gp.clone()
        optimizer.step()


def test_eight_bit_adamw_follows_torch_with_a_quarter_of_its_state():
    """Full fine-tuning of a small Llama, 6 steps on the same random gradients: the 8-bit optimizer's weights
    follow torch AdamW's (its moments are quantized, so not exactly); its state takes ~1/4 of the bytes, and the
    tied embedding keeps 32-bit state."""
    a, b = tiny_llama(0), tiny_llama(0)
    torch_opt = make_optimizer("adamw", a, lr=1e-3, weight_decay=0.1)
    bnb_opt = make_optimizer("adamw-8bit", b, lr=1e-3, weight_decay=0.1)
    pa, pb = list(a.parameters()), list(b.parameters())
    g = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=g) * (1 + k) for p in pa] for k in range(6)]
    start = [p.detach().clone() for p in pa]
    _steps(torch_opt, pa, grads)
    _steps(bnb_opt, pb, grads)
    for p0, x, y in zip(start, pa, pb):
        moved_torch, moved_8bit = x.detach() - p0, y.detach() - p0
        err = (moved_8bit - moved_torch).norm() / moved_torch.norm()
        assert err < 0.05, err  # 8-bit blockwise moments: a few percent of the update
    embedding = b.get_input_embeddings().weight
    assert bnb_opt.state[embedding]["state1"].dtype == torch.float32
    big = [p for p in pb if p.numel() >= 4096 and p is not embedding]
    assert big and all(bnb_opt.state[p]["state1"].dtype == torch.uint8 for p in big)
    small = [p for p in pb if p.numel() < 4096]
    assert small and all(bnb_opt.state[p]["state1"].dtype == torch.float32 for p in small)
    eight = sum(bnb_opt.state[p]["state1"].numel() * 2 for p in big)  # two uint8 moments
    fp32 = sum(p.numel() * 8 for p in big)
    assert eight * 4 == fp32


@pytest.mark.parametrize("name", ["adamw", "adamw-8bit"])
def test_weight_decay_leaves_biases_and_norms_alone(name):
    """--weight-decay decayed every trainable tensor, RMSNorm scales and biases too (transformers' Trainer, which
    peft users train with, leaves those out). One step on zero gradients moves a weight by weight decay alone."""
    model = tiny_llama(0, attention_bias=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias") or "norm" in n:  # zeros and ones at init: nonzero, unequal values
                p.uniform_(0.5, 1.5)
    optimizer = make_optimizer(name, model, lr=0.1, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    kept = {n for n, p in model.named_parameters() if torch.equal(p.detach(), before[n])}
    decayed = {n for n, p in model.named_parameters() if torch.allclose(p.detach(), before[n] * 0.95)}
    assert kept == {n for n, _ in model.named_parameters() if "norm" in n or n.endswith(".bias")}
    assert decayed == set(before) - kept and any("bias" in n for n in kept)


@pytest.mark.parametrize("method", ["ia3", "dora"])
def test_weight_decay_leaves_the_methods_scales_alone(method):
    """IA3's vectors (identity 1) and DoRA's magnitudes (the weights' column norms) were pulled toward 0: IA3 at its
    lr 0.5 with --weight-decay 0.1 kept 0.13 of each scale after 40 steps of zero gradients."""
    from fastft.integration.methods import MethodOptions, apply_method

    model = apply_method(tiny_llama(0), method, MethodOptions(rank=4))
    optimizer = make_optimizer("adamw", model, lr=0.5, weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    kept = {n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p.detach(), before[n])}
    scales = {n for n in before if "ia3_l" in n or "lora_magnitude_vector" in n}
    assert scales and scales <= kept
    assert kept - scales == {n for n in before if "lora_B" in n}  # zeros at init: decay leaves them zero
    assert all(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters() if "lora_A" in n)


def test_a_checkpoint_keeps_this_runs_optimizer_implementation(tmp_path):
    """torch's load_state_dict restores a group's fused/foreach flags with its state: a checkpoint written by a
    fused run resumed where fastft keeps AdamW unfused (FSDP, fp16's GradScaler) ran fused again."""
    from accelerate import Accelerator
    from safetensors.torch import save_file

    from fastft.apps.training import checkpoints as ckpt

    model = tiny_llama(0)
    step = tmp_path / "checkpoints" / "step-00000002"
    step.mkdir(parents=True)
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, str(step / "trainable.safetensors"))
    written = torch.optim.AdamW(parameter_groups(model, 0.1), lr=1e-3, weight_decay=0.1, fused=True)  # CPU-fused
    torch.save(written.state_dict(), step / "optimizer.pt")
    torch.save(ckpt.rng_state(), step / "rng-0.pt")
    resumed = make_optimizer("adamw", model, 1e-3, 0.1)
    ckpt.Checkpoints(tmp_path, Accelerator(cpu=True)).load(step, model, resumed)
    assert [g["fused"] for g in resumed.param_groups] == [None, None]


def test_a_checkpoint_of_another_optimizer_layout_is_refused(tmp_path):
    """A checkpoint written before weight decay skipped biases and norms holds one parameter group; loading it into
    two raised torch's bare ValueError mid-resume."""
    from accelerate import Accelerator
    from safetensors.torch import save_file

    from fastft.apps.training import checkpoints as ckpt

    model = tiny_llama(0)
    step = tmp_path / "checkpoints" / "step-00000002"
    step.mkdir(parents=True)
    save_file({n: p.detach().contiguous() for n, p in model.named_parameters()}, str(step / "trainable.safetensors"))
    torch.save(torch.optim.AdamW(model.parameters()).state_dict(), step / "optimizer.pt")
    torch.save(ckpt.rng_state(), step / "rng-0.pt")
    with pytest.raises(ConfigError, match="optimizer state in 1 parameter group.*makes 2"):
        ckpt.Checkpoints(tmp_path, Accelerator(cpu=True)).load(step, model, make_optimizer("adamw", model, 1e-3, 0.1))


def test_settings_eight_bit_adamw_cannot_run_with(monkeypatch):
    with pytest.raises(ConfigError, match="paged-adamw-8bit pages its state through CUDA unified memory"):
        validate(TrainConfig(optimizer="paged-adamw-8bit"))
    with pytest.raises(ConfigError, match="not FSDP's shards"):
        validate(TrainConfig(optimizer="adamw-8bit", distributed="fsdp"))
    with pytest.raises(ConfigError, match="--optimizer must be one of adamw, adamw-8bit, paged-adamw-8bit"):
        validate(TrainConfig(optimizer="sgd"))
    with pytest.raises(ValueError, match="cannot update FSDP-sharded parameters"):
        make_optimizer("adamw-8bit", tiny_llama(0), 1e-3, 0.0, fsdp=True)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match="needs bitsandbytes"):
        validate(TrainConfig(optimizer="adamw-8bit"))


def test_why_fp16_keeps_adamw_unfused():
    """accelerate tells a GradScaler-skipped step by the optimizer's step not being called; the scaler calls a
    fused optimizer's step whatever happens (the kernel skips an overflowed update inside), so accelerate reports
    it as taken and fastft train's schedule would advance. make_optimizer(grad_scaler=True) stays unfused."""
    from accelerate import Accelerator
    from accelerate.optimizer import AcceleratedOptimizer

    Accelerator(cpu=True)
    reported = {}
    for fused in (True, None):  # torch's fused AdamW runs on the CPU too
        p = torch.nn.Parameter(torch.ones(4))
        optimizer = torch.optim.AdamW([p], lr=0.1, fused=fused)
        scaler = torch.amp.GradScaler("cpu")
        wrapped = AcceleratedOptimizer(optimizer, device_placement=False, scaler=scaler)
        scaler.scale((p * torch.tensor([float("inf"), 1, 1, 1])).sum()).backward()
        wrapped.step()
        assert torch.equal(p.detach(), torch.ones(4))  # the overflowed update is skipped either way
        reported[fused] = wrapped.step_was_skipped
    assert reported == {True: False, None: True}


def _argv(tiny, out, steps, *extra):
    return ["train", "--model", str(tiny), "--method", "full", "--optimizer", "adamw-8bit", "--steps", str(steps),
            "--batch-size", "3", "--eval-examples", "4", "--max-length", "24", "--lr", "1e-3", "--save-every", "2",
            "--schedule", "constant", "--warmup-ratio", "0", "--output-dir", str(out), *extra]


@pytest.mark.slow
def test_full_fine_tuning_with_eight_bit_adamw_resumes_bit_identically(tiny, tmp_path, one_thread, capsys):
    """A 4-step run, and one stopped at step 2 then resumed to 4: the same weights to the bit (the 8-bit state,
    its absmax and the embedding's 32-bit state all come back from the checkpoint). A resume with torch's AdamW
    is refused: its state is another format."""
    assert main(_argv(tiny, tmp_path / "straight", 4)) == 0
    assert main(_argv(tiny, tmp_path / "resumed", 2)) == 0
    with pytest.raises(SystemExit):
        main(_argv(tiny, tmp_path / "resumed", 4, "--resume", "--optimizer", "adamw"))
    assert "--optimizer 'adamw-8bit' -> 'adamw'" in capsys.readouterr().err
    assert main(_argv(tiny, tmp_path / "resumed", 4, "--resume")) == 0
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    metrics = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert metrics["config"]["optimizer"] == "adamw-8bit"
    assert all(loss == loss for loss in metrics["train_losses"])
    state = torch.load(tmp_path / "straight" / "checkpoints" / "step-00000004" / "optimizer.pt", weights_only=False)
    moments = [v["__bnb_optimizer_quant_state__"]["state1"] for v in state["state"].values()]  # bnb's layout
    assert {m.dtype for m in moments} == {torch.uint8, torch.float32}


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_loraplus_gives_lora_b_the_learning_rate_peft_does(method):
    """--loraplus-lr-ratio: every parameter's learning rate is the one peft's create_loraplus_optimizer gives it
    (B matrices lr × ratio, the rest lr), and the schedule scales both."""
    from peft.optimizers import create_loraplus_optimizer

    from fastft.integration.methods import MethodOptions, apply_method

    model = apply_method(tiny_llama(0), method, MethodOptions(rank=4))
    ours = make_optimizer("adamw", model, lr=1e-3, weight_decay=0.1, loraplus_lr_ratio=16)
    peft_opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.1)

    def lrs(optimizer):
        return {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}

    assert lrs(ours) == lrs(peft_opt) and sorted(set(lrs(ours).values())) == [1e-3, 16e-3]
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(("lora_B" in names[i] or "magnitude" in names[i]) == (lr == 16e-3) for i, lr in lrs(ours).items())
    schedule = torch.optim.lr_scheduler.LambdaLR(ours, lambda step: 0.5)
    assert sorted({g["lr"] for g in ours.param_groups}) == [0.5e-3, 8e-3]
    assert len(schedule.base_lrs) == len(ours.param_groups)
    assert len(make_optimizer("adamw", model, lr=1e-3, weight_decay=0.0).param_groups) == 1  # off: one group
