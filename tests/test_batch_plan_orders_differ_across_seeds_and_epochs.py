"""fastft train's record order per epoch was seeded with seed + epoch: --seed 0's epoch 1 was --seed 1's epoch 0, so
runs with neighbouring seeds trained on the same orders shifted by an epoch. Every (seed, epoch) now has its own
order; a checkpoint written under the old rule resumes with it (its epoch's remaining records stay the ones it had
not trained on), and an unknown rule is refused."""
import pytest

from fastft.apps.training.config import ConfigError
from fastft.apps.training.data import BatchPlan


def _orders(seed, epochs, records=16):
    plan = BatchPlan(records, 4, 1, 1, seed)
    steps = [plan.next_step(0)[0] for _ in range(epochs * records // 4)]
    return [sum(steps[e * 4:(e + 1) * 4], []) for e in range(epochs)]


def test_neighbouring_seeds_share_no_epoch_order():
    seed0, seed1 = _orders(0, 3), _orders(1, 3)
    assert all(sorted(order) == list(range(16)) for order in seed0 + seed1)
    assert not any(a == b for a in seed0 for b in seed1)
    assert len({tuple(order) for order in seed0}) == 3


def test_a_checkpoint_of_the_old_rule_resumes_with_it():
    plan = BatchPlan(16, 4, 1, 1, seed=0)
    state = plan.state_dict()
    del state["order_rule"]  # written before the rule changed
    state["epoch"], state["index"] = 1, 4
    resumed = BatchPlan(16, 4, 1, 1, seed=0)
    resumed.load_state_dict(state)
    old_epoch_1 = _orders_of_old_rule(seed=0, epoch=1)
    assert resumed.next_step(0)[0] == old_epoch_1[4:8]
    assert resumed.state_dict()["order_rule"] == "seed+epoch"  # and its next checkpoint keeps saying so


def _orders_of_old_rule(seed, epoch, records=16):
    import torch

    return torch.randperm(records, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def test_an_unknown_rule_is_refused():
    state = BatchPlan(16, 4, 1, 1, seed=0).state_dict()
    state["order_rule"] = "something newer"
    with pytest.raises(ConfigError, match="orders its records by 'something newer'"):
        BatchPlan(16, 4, 1, 1, seed=0).load_state_dict(state)
