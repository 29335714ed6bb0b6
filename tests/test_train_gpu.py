"""`fastft train` on a GPU: bf16 with fused LoRA kernels, packing through attn_implementation="fastft",
and QLoRA; a tiny model, a few steps (never run in this session's CPU-only environment)."""
import json

import pytest
import torch

from fastft.apps.cli import main
from tests.train_utils import save_tiny_checkpoint

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("extra", [[], ["--attn-implementation", "fastft", "--grad-accum", "2"],
                                   ["--method", "qlora", "--gradient-checkpointing", "--offload-activations"]])
def test_train_on_gpu(tmp_path, extra):
    tiny = save_tiny_checkpoint(tmp_path / "tiny")
    out = tmp_path / "run"
    assert main(["train", "--model", str(tiny), "--task", "instructions", "--steps", "4", "--batch-size", "4",
                 "--max-length", "128", "--eval-examples", "8", "--lr", "3e-3", "--output-dir", str(out), *extra]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["device"].startswith("cuda") and metrics["config"]["dtype"] == "auto"
    assert all(loss == loss for loss in metrics["train_losses"])
    assert metrics["eval_after"]["loss"] < metrics["eval_before"]["loss"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
