"""The host's size helpers that every launcher's block sizes and tuning keys come from: `next_power_of_2` is the
smallest power of two >= n (a power of two maps to itself: doubling it would double a padded rank or a row block,
twice the registers for masked lanes), `bucket` rounds token counts up to it (1 for an empty call) so tuning keys
repeat, and `cdiv` is the ceiling of a / b. Checked against their definitions over a range, not a few values."""
import math

from fastft.kernels.host import bucket
from fastft.kernels.runtime import cdiv, next_power_of_2


def test_next_power_of_2_is_the_smallest_power_of_two_not_below_n():
    for n in range(1, 1025):
        p = next_power_of_2(n)
        assert p >= n and p & (p - 1) == 0, n
        assert p == 1 or p // 2 < n, n           # the smallest such power
    for k in range(0, 40):
        assert next_power_of_2(2**k) == 2**k
        assert next_power_of_2(2**k + 1) == 2**(k + 1)


def test_bucket_groups_token_counts_by_their_power_of_two():
    assert bucket(0) == 1 and bucket(1) == 1
    for n in range(2, 600):
        assert bucket(n) == 2 ** math.ceil(math.log2(n)), n
    assert len({bucket(n) for n in range(513, 1025)}) == 1   # a changing count within one power: one key


def test_cdiv_is_the_ceiling_of_the_quotient():
    for a in range(0, 300):
        for b in (1, 2, 3, 16, 64, 128):
            assert cdiv(a, b) == math.ceil(a / b), (a, b)
