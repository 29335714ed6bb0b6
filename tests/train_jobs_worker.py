"""Run by tests/test_train_distributed.py under torchrun (2 processes, gloo): several `fastft train` runs in one
launch, in order, so the launch (importing torch, transformers, peft and bitsandbytes in three processes: ~15 s
here) is paid once rather than per run. fastft train supports many runs in one process (make_accelerator resets
accelerate's state and keeps the process group).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/train_jobs_worker.py JOBS.json

JOBS.json: a list of jobs, each {"argv": [...]} (fastft train's argv: must return 0) or {"copy": [src, dst]}
(rank 0 copies the folder src to dst, e.g. a finished run's adapter before a --resume run rewrites it). A failing
job raises, naming it, and the launch ends."""
import json
import os
import shutil
import sys

from fastft.apps.cli import main


def run(jobs: list[dict]) -> None:
    rank = int(os.environ.get("RANK", "0"))
    for i, job in enumerate(jobs):
        if "copy" in job:
            if rank == 0:
                shutil.copytree(*job["copy"])
            continue
        code = main(job["argv"])
        if code != 0:
            raise SystemExit(f"job {i} ({' '.join(job['argv'])}) returned {code}")


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        run(json.load(f))
