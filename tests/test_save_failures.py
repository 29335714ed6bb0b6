"""A save that fails on one rank of two (torchrun + gloo on the CPU) raises on both at once: a checkpoint whose
write fails on rank 1 or whose folder rank 0 cannot make, and the final adapter save (rank 0 writes). Before, the
other rank waited in a barrier until the process group's timeout (30 min)."""
import json
import os
import signal
import subprocess
import sys

import pytest

from tests.train_utils import save_tiny_checkpoint

pytestmark = pytest.mark.slow  # two processes, a one-step training run


def test_a_save_failing_on_one_rank_stops_every_rank(tmp_path):
    model = save_tiny_checkpoint(tmp_path / "tiny", layers=1)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i} packs a few tokens"}) + "\n" for i in range(8)))
    run = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                            os.path.join(os.path.dirname(__file__), "save_failure_worker.py"), str(tmp_path),
                            str(model), str(data)], env=dict(os.environ, OMP_NUM_THREADS="1"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        _, stderr = run.communicate(timeout=300)
    except subprocess.TimeoutExpired:  # a rank waits in a barrier: end torchrun and its workers, then fail
        os.killpg(run.pid, signal.SIGKILL)
        raise
    assert run.returncode == 0, stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"report-{r}.json").read_text()) for r in (0, 1))

    assert rank1["rank1_fails"] == "OSError: [Errno 28] No space left on device"
    assert rank0["rank1_fails"] == "OSError: checkpoint: rank 1 failed (OSError: [Errno 28] No space left on device)"
    assert rank0["rank1_fails_left"] == rank1["rank1_fails_left"] == []  # the unfinished folder is gone

    assert rank0["rank0_fails"].startswith("FileExistsError: ")
    assert rank1["rank0_fails"].startswith("OSError: checkpoint: rank 0 failed (FileExistsError: ")

    assert rank0["then_saves"] is None and rank1["then_saves"] is None
    assert rank0["then_left"] == ["step-00000002"]

    assert rank0["final_save_exit"] == rank1["final_save_exit"] == 1
    assert "the adapter or metrics.json could not be saved" in stderr, stderr[-3000:]
