"""Pickling a double-quantized NF4Weight (torch.save of a module or tensor, multiprocessing) keeps its nested
offset: the copy dequantizes to the same values."""
import io
import pickle

import torch

from fastft.quant import quantize_nf4


def test_pickle_and_torch_save_round_trip_a_double_quantized_weight():
    torch.manual_seed(0)
    w = quantize_nf4(torch.randn(16, 128) * 2.0 + 1.0, blocksize=64, double_quant=True)
    assert w.offset != 0.0
    copy = pickle.loads(pickle.dumps(w))
    assert copy.offset == w.offset
    assert torch.equal(copy.dequantize(), w.dequantize())
    buf = io.BytesIO()
    torch.save(w, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert torch.equal(loaded.dequantize(), w.dequantize())
