"""A compiled NF4 op reads a weight's nested offset (a 0-d tensor) once and caches the float per tensor *and
version*: after `weight.copy_(other)` (a state-dict load into the layer) the compiled call decodes with the new
offset, as eager does, instead of the stale one."""
import torch

from fastft.ops.qlora import nf4_linear
from fastft.quant import quantize_nf4
from tests.utils import interpreter_only


@interpreter_only
def test_compiled_nf4_linear_sees_the_offset_copied_in():
    torch.manual_seed(0)
    w = quantize_nf4(torch.randn(64, 128), double_quant=True)
    other = quantize_nf4(torch.randn(64, 128) * 3.0 + 0.5, double_quant=True)
    assert w.offset != other.offset
    x = torch.randn(3, 128)
    fn = lambda w, x: nf4_linear(x, w, backend="triton")  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(w, x), fn(w, x), atol=0, rtol=0)
    w.copy_(other)
    torch.testing.assert_close(compiled(w, x), fn(other, x), atol=0, rtol=0)
