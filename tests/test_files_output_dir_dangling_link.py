"""An --output-dir that is a dangling link is refused up front (fastft.files.output_dir_problem): it is no folder,
and creating the run's files through it fails later, mid-run. Judged by its parent instead, it passed."""
import os

from fastft.files import output_dir_problem


def test_a_dangling_link_is_no_output_folder(tmp_path):
    link = tmp_path / "run"
    os.symlink(tmp_path / "gone", link)
    assert not link.exists() and os.path.lexists(link)
    problem = output_dir_problem(link)
    assert problem == f"--output-dir {link}: exists and is not a folder; give a folder, or a path to create"
    problem = output_dir_problem(link / "sub")
    assert problem is not None and f": {link} exists and is not a folder" in problem
    (tmp_path / "gone").mkdir()                              # the link resolves again: a folder
    assert output_dir_problem(link) is None

