"""`fastft bench --dtype auto` is bf16 on CUDA and fp32 elsewhere (what the targets and the table's header assume);
an unknown name is refused. No GPU needed: only the device type is read."""
import pytest
import torch

from fastft.apps.bench.shapes import resolve_dtype


def test_auto_is_bf16_on_cuda_and_fp32_on_the_cpu():
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda", 1)) is torch.bfloat16
    assert resolve_dtype("auto", torch.device("cpu")) is torch.float32
    assert resolve_dtype("fp16", torch.device("cuda")) is torch.float16
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("bfloat16", torch.device("cpu"))
