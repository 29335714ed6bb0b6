"""--seed of `fastft bench` takes exactly [0, 2**32 - 1] (numpy's and accelerate's range): the edges are accepted
and refused one past them."""
import pytest

from fastft.apps.bench.config import BenchConfig

TINY = dict(shape="tiny", methods=("lora",), peers=(), output_dir="bench-results-unused")


@pytest.mark.parametrize("seed", [0, 2**32 - 1])
def test_seeds_at_the_edges_are_accepted(seed):
    BenchConfig(**TINY, seed=seed).validate()


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_seeds_one_past_the_edges_are_refused(seed):
    with pytest.raises(ValueError, match="--seed must be in"):
        BenchConfig(**TINY, seed=seed).validate()
