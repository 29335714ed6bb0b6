"""benchmarks/gpu_check.sh, the one prepared GPU script, read as text on the CPU: every section its default list
and its presets name has a branch, and every file a branch runs exists. A GPU session is rare and short; a typo
there would spend it on "unknown section"."""
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = open(os.path.join(ROOT, "benchmarks", "gpu_check.sh")).read()
BRANCHES = dict(re.findall(r"^\s+([a-z0-9-]+)\) (.*?);;", SCRIPT, flags=re.M | re.S))


def _named_lists() -> dict[str, list[str]]:
    lists = {"default": re.search(r'sections="\$\{\*:-([^}]*)\}"', SCRIPT).group(1).split()}
    for preset, names in re.findall(r'sections="\$\{sections//([a-z0-9-]+)/([^}]*)\}"', SCRIPT):
        lists[preset] = names.split()
    return lists


def test_the_script_has_its_sections_and_presets():
    assert len(BRANCHES) >= 20 and "issue10" in _named_lists(), sorted(BRANCHES)


@pytest.mark.parametrize("name,sections", sorted(_named_lists().items()))
def test_every_listed_section_has_a_branch(name, sections):
    assert sections and not [s for s in sections if s not in BRANCHES], f"{name}: {sections}"


@pytest.mark.parametrize("section", sorted(BRANCHES))
def test_every_file_a_branch_runs_exists(section):
    paths = re.findall(r"(?:benchmarks|tests)/[\w/]+\.py", BRANCHES[section])
    modules = re.findall(r"-m (fastft(?:\.\w+)+)", BRANCHES[section])
    missing = [p for p in paths if not os.path.exists(os.path.join(ROOT, p))]
    missing += [m for m in modules if not os.path.exists(os.path.join(ROOT, *m.split(".")) + ".py")]
    assert not missing, f"{section}: {missing}"
