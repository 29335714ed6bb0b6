"""compute_input's shared bf16 cast (fastft.ops.shared._shared_cast) is handed to the next layer fed the same fp32 x
only while the cast itself is unchanged: the one last handed out, written in place, is not handed out again.
(test_kbit_shared_input_cast.test_a_changed_x_is_cast_again writes an older cast, not the one kept: the cast's own
version check went untested.)"""
import torch

from fastft.ops import shared


def test_the_kept_cast_written_in_place_is_cast_again():
    weight = torch.empty(2, 2, dtype=torch.bfloat16)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    cast = shared.compute_input(x, weight)
    assert shared.compute_input(x, weight) is cast  # kept while nothing changed
    cast.zero_()  # the very cast kept for the next layer
    again = shared.compute_input(x, weight)
    assert again is not cast
    assert torch.equal(again, x.to(torch.bfloat16))
