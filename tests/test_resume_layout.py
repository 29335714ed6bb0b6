"""--resume compares how the run's state lies over its processes (run_setup.distribution_layout), not how
--distributed was spelled: auto and ddp are the same DDP under torchrun, and auto under an `accelerate launch` FSDP
config is FSDP (a GPU-only launch: its accelerator stood in for here)."""
from pathlib import Path
from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from fastft.apps.training.config import ConfigError, TrainConfig, to_yaml_dict
from fastft.apps.training.resume_checks import check_resumed_layout, check_resumed_settings
from fastft.apps.training.run_setup import distribution_layout
from fastft.apps.training import checkpoints as ckpt


@pytest.mark.parametrize("distributed, processes, kind, layout", [
    ("auto", 1, DistributedType.NO, "none"), ("none", 1, DistributedType.NO, "none"),
    ("auto", 2, DistributedType.MULTI_CPU, "ddp"), ("ddp", 2, DistributedType.MULTI_GPU, "ddp"),
    ("fsdp", 2, DistributedType.MULTI_CPU, "fsdp"),  # on the CPU fastft shards itself (accelerate runs no FSDP)
    ("auto", 2, DistributedType.FSDP, "fsdp"), ("auto", 1, DistributedType.FSDP, "fsdp")])  # an accelerate config
def test_the_layout_is_what_the_launch_runs(distributed, processes, kind, layout):
    accelerator = SimpleNamespace(num_processes=processes, distributed_type=kind)
    assert distribution_layout(TrainConfig(distributed=distributed), accelerator) == layout


def test_another_layout_is_refused_naming_both_and_an_old_checkpoint_passes():
    with pytest.raises(ConfigError, match=r"state was whole on every process \(DDP\), this run's is sharded over "
                                          r"the processes \(FSDP\); resume under the launch it started with"):
        check_resumed_layout("ddp", "fsdp", Path("ckpt"))
    check_resumed_layout("fsdp", "fsdp", Path("ckpt"))
    check_resumed_layout(None, "fsdp", Path("ckpt"))  # written before the layout was kept: --distributed compares


def test_distributed_may_change_its_spelling_only_where_the_layout_was_kept():
    saved = ckpt.comparable_settings(to_yaml_dict(TrainConfig(distributed="auto")))
    now = TrainConfig(distributed="ddp")
    check_resumed_settings(now, saved, Path("ckpt"), layout_recorded=True)
    with pytest.raises(ConfigError, match=r"--distributed 'auto' -> 'ddp'"):
        check_resumed_settings(now, saved, Path("ckpt"), layout_recorded=False)
