"""`python -m fastft.apps.bench.report RESULTS.json [OUT_DIR]` and `python -m fastft.apps.study.report ...`: a
command's report drawn again from its results JSON alone (a GPU run can bring back only the JSON). Errors (a
missing, unreadable or foreign file, an OUT_DIR that cannot be one) are one line and exit status 2, as argparse
gives them."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastft.files import output_dir_problem


def redraw_main(argv: list[str] | None, *, module: str, command: str, file_name: str, draws: str,
                fields: dict[str, type], write) -> int:
    """`module`'s main: reads RESULTS.json (`file_name`, written by `command`; a dict holding `fields`, each of
    its type) and calls write(results, out_dir) -> {name: path written}."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}",
                                     description=f"Draw {draws} again from a {command} results file.")
    parser.add_argument("results", metavar="RESULTS.json", help=f"a results file of {command} ({file_name})")
    parser.add_argument("out_dir", metavar="OUT_DIR", nargs="?", help="where to write them (default: RESULTS.json's "
                                                                      "folder)")
    args = parser.parse_args(argv)
    source = Path(args.results)
    wanted = f"give the {file_name} that {command} wrote (in its --output-dir)"
    if not source.is_file():
        parser.error(f"{source}: {'is a directory' if source.is_dir() else 'no such file'}; {wanted}")
    try:
        result = json.loads(source.read_text(encoding="utf-8"))
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        parser.error(f"{source}: not valid JSON ({e})")
    foreign = f"{source}: not a {command} results file"
    if not (isinstance(result, dict) and all(isinstance(result.get(k), kind) for k, kind in fields.items())):
        parser.error(f"{foreign} (it needs its {', '.join(fields)}); {wanted}")
    out_dir = Path(args.out_dir or source.parent)
    problem = output_dir_problem(out_dir, "OUT_DIR")
    if problem:
        parser.error(problem)
    try:
        paths = write(result, out_dir)
    except (KeyError, TypeError) as e:  # an entry without its fields: another program's JSON, or one edited by hand
        parser.error(f"{foreign} ({type(e).__name__}: {e}); {wanted}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
