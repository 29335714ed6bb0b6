"""The write probe of output_dir_problem (a file created and removed in --output-dir, or its nearest existing parent,
before a run starts) killed between the two: it was named `.fastft-write-test-XXXXXXXX`, a name no cleanup knew, and
stayed in the folder for good. It is a temporary of fastft's naming now: the next probe of the folder removes it, and
so does a run's cleanup of its --output-dir."""
import os
import signal
import sys

from fastft.apps.training.run_lock import clean_output_dir
from fastft.files import output_dir_problem


def _probe_killed_at_its_removal(folder) -> None:
    """output_dir_problem(folder) in a forked child SIGKILLed at the moment it removes a file it made there."""
    pid = os.fork()
    if pid == 0:  # the child: killed where a SIGKILL leaves the most behind (its probe made, not yet removed)
        def hook(event, args):
            if event == "os.remove" and os.path.dirname(os.fspath(args[0])) == str(folder):
                os.kill(os.getpid(), signal.SIGKILL)
        sys.addaudithook(hook)
        output_dir_problem(folder)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def test_a_killed_probe_is_removed_by_the_next_probe_and_by_a_runs_cleanup(tmp_path):
    for clean in (output_dir_problem, clean_output_dir):
        folder = tmp_path / clean.__name__
        folder.mkdir()
        _probe_killed_at_its_removal(folder)
        assert os.listdir(folder)  # what the killed probe left
        assert clean(folder) is None
        assert os.listdir(folder) == []
