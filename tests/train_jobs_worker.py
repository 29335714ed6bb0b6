"""Run by tests/test_train_distributed.py under torchrun (2 processes, gloo): several `fastft train` runs in one
launch, in order, so the launch (importing torch, transformers, peft and bitsandbytes in three processes: ~15 s
here) is paid once rather than per run. fastft train supports many runs in one process (make_accelerator resets
accelerate's state and keeps the process group).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/train_jobs_worker.py JOBS.json

JOBS.json: a list of jobs, each {"argv": [...]} (fastft train's argv: must return 0, or "code" when given: a
refusal's 2), {"copy": [src, dst]}
(rank 0 copies the folder src to dst, e.g. a finished run's adapter before a --resume run rewrites it) or
{"remove": path} (rank 0 removes that file: a finished run's metrics.json, so that it looks killed after its last
checkpoint and a --resume trains its last steps again). A failing job raises, naming it, and the launch ends."""
import json
import os
import shutil
import sys

import torch

from fastft.apps.cli import main


def run(jobs: list[dict]) -> None:
    rank = int(os.environ.get("RANK", "0"))
    for i, job in enumerate(jobs):
        if "copy" in job or "remove" in job:
            if rank == 0:
                if "copy" in job:
                    shutil.copytree(*job["copy"])
                else:
                    os.remove(job["remove"])
            if torch.distributed.is_initialized():  # the other ranks' next run reads what rank 0 changed
                torch.distributed.barrier()
            continue
        try:
            code = main(job["argv"])
        except SystemExit as e:  # a refusal (fastft train's settings errors exit 2)
            code = e.code
        if code != job.get("code", 0):
            raise SystemExit(f"job {i} ({' '.join(job['argv'])}) returned {code}")


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        run(json.load(f))
    if torch.distributed.is_initialized():  # as the fastft command does (fastft.apps.cli.command)
        torch.distributed.destroy_process_group()
