"""PackingCollator: an example whose "labels" is None (as datasets' columns give a missing value) trains on its
input_ids, as one without the key does; pad_to_multiple_of must be a positive int (0 is refused, not taken as off)."""
import pytest

from fastft.integration.packing import IGNORE_INDEX, PackingCollator


def test_labels_none_is_labels_absent():
    batch = PackingCollator(return_flash_kwargs=False)([{"input_ids": [5, 6, 7], "labels": None},
                                                         {"input_ids": [8, 9]}])
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]


@pytest.mark.parametrize("multiple", [0, -8, 2.0])
def test_a_pad_to_multiple_of_that_is_no_positive_int_is_refused(multiple):
    with pytest.raises(ValueError, match="`pad_to_multiple_of` must be a positive int"):
        PackingCollator(pad_to_multiple_of=multiple)
