"""A bench row whose first loss is already non-finite is "diverged" even when its last loss is finite: the
verdict reads both ends of the loss, not only the last one."""
from fastft.apps.bench import run


def test_a_non_finite_first_loss_is_diverged_whatever_the_last():
    for first in (float("nan"), float("inf")):
        verdict = run._verdict({"loss_first": first, "loss_last": 5.0})
        assert verdict["status"] == "diverged" and "non-finite" in verdict["reason"], verdict
    assert run._verdict({"loss_first": 6.0, "loss_last": 5.0}) == {"status": "ok"}
