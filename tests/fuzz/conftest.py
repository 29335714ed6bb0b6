"""Hypothesis profiles of the fuzz suite.

ci (default): a fixed seed (strategies.FUZZ_SEED) and the example database kept in the repo
    (tests/fuzz/.hypothesis-examples), read-only, so every CI run replays the saved failures first and then
    tests the same examples.
dev (FASTFT_FUZZ_PROFILE=dev): fresh random examples each run; failures are saved to that database (commit
    them: they become regression cases for everyone).
FASTFT_FUZZ_EXAMPLES=N raises every test's example count (strategies.fuzz); FASTFT_FUZZ_REPORT=path writes the
examples run per op and the worst error/bound ratio per (op, dtype) as JSON at the end of the session.
"""
import fcntl
import json
import os
from pathlib import Path

import pytest
from hypothesis import Phase, settings
from hypothesis.database import DirectoryBasedExampleDatabase, ReadOnlyDatabase

from tests.fuzz import references

EXAMPLES_DB = Path(__file__).parent / ".hypothesis-examples"

# The fixed seed itself is applied per test by strategies.fuzz (hypothesis ties derandomize to "no database").
settings.register_profile("ci", database=ReadOnlyDatabase(DirectoryBasedExampleDatabase(EXAMPLES_DB)),
                          print_blob=True, phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink])


class KeepingExampleDatabase(DirectoryBasedExampleDatabase):
    """Never forgets an example: hypothesis drops saved failures that pass again, but a fixed failure should stay
    a regression case that CI replays."""

    def delete(self, key, value):
        pass

    def move(self, src, dest, value):
        self.save(dest, value)


settings.register_profile("dev", derandomize=False, database=KeepingExampleDatabase(EXAMPLES_DB), print_blob=True)
settings.load_profile(os.environ.get("FASTFT_FUZZ_PROFILE", "ci"))


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("FASTFT_FUZZ_REPORT")
    if not path or not (references.STATS or references.EXAMPLES):
        return
    # under pytest-xdist every worker ends its own session with the ops it ran: they merge into one report, under a
    # lock, by the run's id (a report left by an earlier run is replaced, not merged)
    run = getattr(session.config, "workerinput", {}).get("testrunuid")
    examples, worst = dict(references.EXAMPLES), {f"{op} {dt}": v for (op, dt), v in references.STATS.items()}
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            earlier = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            earlier = {}
        if run is not None and earlier.get("run") == run:
            for op, n in earlier["examples"].items():
                examples[op] = examples.get(op, 0) + n
            for key, theirs in earlier["worst_error_over_bound"].items():  # {comparisons, worst, where}
                ours = worst.get(key)
                if ours is None:
                    worst[key] = theirs
                else:
                    worst[key] = dict(max(ours, theirs, key=lambda s: s["worst"]),
                                      comparisons=ours["comparisons"] + theirs["comparisons"])
        report = {"run": run, "examples": dict(sorted(examples.items())),
                  "worst_error_over_bound": dict(sorted(worst.items()))}
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(path)


@pytest.fixture
def exact_cuda_reductions():
    """cuBLAS may reduce fp16/bf16 GEMMs in reduced precision (split-K partial sums in the output dtype), an
    unknown number of roundings; the bounds count them, so the GPU fuzz tests switch that off for their run."""
    import torch

    m = torch.backends.cuda.matmul
    saved = (m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction)
    m.allow_fp16_reduced_precision_reduction = m.allow_bf16_reduced_precision_reduction = False
    yield
    m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction = saved
