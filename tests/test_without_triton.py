"""fastft without triton, an optional dependency (`pip install 'fastft[triton]'`): a CPU-only torch or macOS install.

One subprocess with triton blocked (sys.modules['triton'] = None before anything is imported, as a missing package
imports) runs every method through fastft.get_peft_model, patch_model with a training step, the fused losses,
merge_and_unload, adapter files and `fastft train`; its numbers must be bit-identical to the same run here, where
triton is installed, on backend='torch'. Asking for the Triton backend there says that triton is missing and how to
install it, naming the setting."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.utils import randomize_lora_B, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
BLOCK_TRITON = "import sys; sys.modules['triton'] = None; sys.modules['triton.language'] = None"
LORA_TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


def _batch(seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    return ids, labels


def _step(model, what: str) -> list[float]:
    """[loss, loss after one SGD step] of a training step in train mode (the step uses every trainable gradient)."""
    ids, labels = _batch()
    model.train()
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.5 * p.grad
                p.grad = None
        after = model(input_ids=ids, labels=labels).loss
    assert torch.isfinite(loss) and after != loss, what
    return [loss.item(), after.item()]


def _eval_loss(model) -> float:
    ids, labels = _batch()
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, labels=labels).loss.item()


def _methods(backend: str, folder: Path) -> dict:
    import peft

    import fastft

    def lora(**kw):
        return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS, **kw)

    configs = {
        "lora": lora,
        "dora": lambda: lora(use_dora=True),
        "ia3": lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                      feedforward_modules=["down_proj"], task_type="CAUSAL_LM"),
        "prefix": lambda: peft.PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
        "prompt": lambda: peft.PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    }
    out = {}
    for name, config in configs.items():
        model = fastft.get_peft_model(tiny_llama(), config())
        randomize_lora_B(model)
        out[name] = _step(model, name)
    for name, config in (("qlora", lora), ("qdora", configs["dora"])):
        model = fastft.get_peft_model(fastft.quantize_model(tiny_llama()), config())  # fastft's own NF4
        randomize_lora_B(model)
        out[name] = _step(model, name)
        out[f"{name}_merged"] = _eval_loss(fastft.merge_and_unload(model))

    model = fastft.get_peft_model(tiny_llama(), lora())
    randomize_lora_B(model)
    out["patched"] = _step(fastft.patch_model(model, backend=backend), "patch_model")
    out["patched_eval"] = _eval_loss(model)
    fastft.save_adapter(model, folder / "adapter")
    out["loaded"] = _eval_loss(fastft.load_adapter(tiny_llama(), folder / "adapter"))
    out["merged"] = _eval_loss(fastft.merge_and_unload(model))
    return out


def _losses(backend: str) -> dict:
    """Each fused loss, forward and backward: [loss, sum of the hidden states' gradient]."""
    from fastft.ops import (linear_cross_entropy, linear_dpo_loss, linear_kl_div, linear_sequence_logprobs,
                            lm_head_cross_entropy)

    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 6, 16, generator=g, requires_grad=True)
    head = torch.nn.Linear(16, 40, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(40, 16, generator=g) * 0.3)
    teacher = torch.randn(2, 6, 8, generator=g)
    teacher_w = torch.randn(40, 8, generator=g)
    labels = torch.randint(0, 40, (2, 6), generator=g)
    labels[0, :2] = -100
    ref = torch.randn(2, generator=g)
    cases = {
        "linear_cross_entropy": lambda: linear_cross_entropy(hidden, head.weight, labels, backend=backend),
        "lm_head_cross_entropy": lambda: lm_head_cross_entropy(hidden, head, labels, backend=backend),
        "linear_kl_div": lambda: linear_kl_div(hidden, head.weight, teacher, teacher_w, labels=labels,
                                               backend=backend),
        "linear_sequence_logprobs": lambda: linear_sequence_logprobs(hidden, head.weight, labels,
                                                                     backend=backend).sum(),
        "linear_dpo_loss": lambda: linear_dpo_loss(hidden, hidden.flip(0), head.weight, labels, labels.flip(0),
                                                   ref_chosen_logps=ref, ref_rejected_logps=-ref,
                                                   backend=backend)[0],
    }
    out = {}
    for name, loss_fn in cases.items():
        loss = loss_fn()
        (dh,) = torch.autograd.grad(loss, hidden)
        out[name] = [loss.item(), dh.double().sum().item()]
    return out


def _custom_ops() -> list[str]:
    """The torch.library ops fastft's ops register at import (what torch.compile traces on the Triton backend)."""
    import importlib
    import pkgutil

    import fastft.ops

    names = set()
    for info in pkgutil.iter_modules(fastft.ops.__path__, "fastft.ops."):
        for value in vars(importlib.import_module(info.name)).values():
            if isinstance(value, torch._library.custom_ops.CustomOpDef):
                names.add(value._qualname)
    return sorted(names)


def exercise(backend: str, folder: str) -> dict:
    """Everything on the torch path, one thread (CPU GEMMs may block differently with more): backend 'auto' where
    triton is blocked, 'torch' (with FASTFT_LORA_BACKEND=torch) where it is installed; the attention backend too,
    restored after (another test may have registered another)."""
    from fastft.integration import attention

    threads, attention_backend = torch.get_num_threads(), attention._backend
    torch.set_num_threads(1)
    attention.register_attention(backend)
    try:
        torch.manual_seed(0)
        return {"methods": _methods(backend, Path(folder)), "losses": _losses(backend), "ops": _custom_ops()}
    finally:
        torch.set_num_threads(threads)
        attention.register_attention(attention_backend)


def _compiled() -> list[float]:
    """[compiled, eager] loss of the LoRA and SwiGLU ops on the torch backend under torch.compile (aot_eager: no
    code generation, so no compiler and no triton), and the compiled gradient against the eager one."""
    from fastft.ops import lora_linear, swiglu

    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(2, 5, 8, generator=g), torch.randn(6, 8, generator=g)
    a, b = torch.randn(3, 8, generator=g, requires_grad=True), torch.randn(6, 3, generator=g, requires_grad=True)

    def loss(x, a, b):
        y = lora_linear(x, w, None, a, b, 0.5)
        return swiglu(y, 2 * y).square().sum()

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)(x, a, b)
    eager = loss(x, a, b)
    grads = [torch.autograd.grad(out, (a, b)) for out in (compiled, eager)]
    assert all(torch.equal(c, e) for c, e in zip(*grads))
    return [compiled.item(), eager.item()]


def _triton_refusals() -> dict:
    """The message of each way to ask for the Triton backend (None: no error)."""
    import fastft
    from fastft.modules.lora import default_backend
    from fastft.ops import lora_linear
    from fastft.ops.shared import resolve_backend

    x, w = torch.randn(3, 8), torch.randn(5, 8)
    a, b = torch.randn(2, 8), torch.randn(5, 2)

    def error(call):
        try:
            call()
        except ValueError as e:
            return str(e)
        return None

    os.environ["FASTFT_LORA_BACKEND"] = "triton"
    env = error(default_backend)
    del os.environ["FASTFT_LORA_BACKEND"]
    return {"op": error(lambda: lora_linear(x, w, None, a, b, 1.0, backend="triton")),
            "env": env,
            "patch_model": error(lambda: fastft.patch_model(tiny_llama(), backend="triton")),
            "register_attention": error(lambda: fastft.register_attention("triton")),
            "auto_on_cuda": resolve_backend("op", "auto", torch.device("cuda"))}


def _tiny_checkpoint(folder: Path) -> Path:
    """tiny_llama saved with a word-level tokenizer of its own (no download, no cached model)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "</s>", "record", "of", "a", "few", *map(str, range(12))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    path = folder / "tiny"
    tiny_llama().save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
                            eos_token="</s>").save_pretrained(path)
    return path


def _cli(folder: Path) -> dict:
    """`fastft train --help`, and one step of LoRA training with --patch-model on."""
    import contextlib
    import io

    from fastft.apps.cli import main

    usage = io.StringIO()
    with contextlib.redirect_stdout(usage), pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0 and "usage: fastft train" in usage.getvalue()
    data = folder / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"record {i} of a few"}) + "\n" for i in range(12)))
    code = main(["train", "--model", str(_tiny_checkpoint(folder)), "--data", str(data), "--steps", "1",
                 "--batch-size", "2", "--eval-examples", "2", "--max-length", "16", "--patch-model", "on",
                 "--output-dir", str(folder / "run")])
    return {"code": code, "metrics": json.loads((folder / "run" / "metrics.json").read_text())}


def _unimportable() -> dict:
    """{module: error} of fastft's modules outside the kernel families (which need triton) that fail to import."""
    import importlib
    import pkgutil

    import fastft

    failed = {}
    for info in pkgutil.walk_packages(fastft.__path__, "fastft."):
        if info.name.startswith("fastft.kernels."):
            continue
        try:
            importlib.import_module(info.name)
        except Exception as e:  # noqa: BLE001  (reported, not raised: the test names every module at once)
            failed[info.name] = f"{type(e).__name__}: {e}"
    return failed


def _main(folder: str) -> None:
    """The subprocess: triton is blocked by the caller's first line, before this module is imported."""
    import fastft  # noqa: F401

    result = {"exercise": exercise("auto", folder), "compiled": _compiled(), "refusals": _triton_refusals(),
              "cli": _cli(Path(folder)), "unimportable": _unimportable()}
    print("RESULT " + json.dumps(result))


@pytest.fixture(scope="module")
def without_triton(tmp_path_factory):
    """What the subprocess with triton blocked reported."""
    env = {k: v for k, v in os.environ.items() if k != "FASTFT_LORA_BACKEND"}
    env["OMP_NUM_THREADS"] = "1"
    folder = tmp_path_factory.mktemp("no_triton")
    code = f"{BLOCK_TRITON}; sys.path.insert(0, {str(ROOT)!r}); from tests.test_without_triton import _main; " \
           f"_main({str(folder)!r})"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
    return json.loads(line.removeprefix("RESULT "))


def test_runs_without_triton_as_the_torch_backend_does(without_triton, tmp_path, monkeypatch):
    """Every method, patch_model's step, the fused losses, merge and adapter files: the same bits as backend='torch'
    with triton installed; the custom ops torch.compile traces register all the same."""
    monkeypatch.setenv("FASTFT_LORA_BACKEND", "torch")
    ours = exercise("torch", str(tmp_path))
    theirs = without_triton["exercise"]
    assert theirs == ours
    methods = theirs["methods"]
    assert methods["loaded"] == methods["patched_eval"]  # the adapter file round trip
    assert abs(methods["merged"] - methods["patched_eval"]) < 1e-5
    assert len(theirs["ops"]) > 5


def test_every_module_imports_without_triton(without_triton):
    """Only the kernel families need triton: the ops import them inside the functions that launch kernels."""
    assert without_triton["unimportable"] == {}


def test_torch_compile_runs_without_triton(without_triton):
    compiled, eager = without_triton["compiled"]
    assert compiled == eager


def test_train_cli_runs_without_triton(without_triton):
    cli = without_triton["cli"]
    losses = cli["metrics"]["train_losses"]
    assert cli["code"] == 0 and len(losses) == 1, cli


def test_triton_backend_asked_for_without_triton_says_what_to_install(without_triton):
    refusals = without_triton["refusals"]
    assert refusals["auto_on_cuda"] == "torch"  # auto picks torch where triton is missing, on CUDA too
    for setting, name in (("op", "lora_linear: backend='triton'"), ("env", "FASTFT_LORA_BACKEND=triton"),
                          ("patch_model", "fastft.patch_model: backend='triton'"),
                          ("register_attention", "register_attention: backend='triton'")):
        message = refusals[setting]
        assert message is not None and message.startswith(name), (setting, message)
        assert "triton, which is not installed (pip install 'fastft[triton]')" in message, (setting, message)
