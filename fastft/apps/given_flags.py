"""Which flags a command line gave, whatever their values: a flag given at its default value looks the same in the
parsed args as one left out, and both `fastft train --config` (the command line wins over the YAML) and `fastft
bench` (one mode's flags refused in the other) must tell them apart."""
from __future__ import annotations

import argparse
from typing import Iterable


def given_dests(actions: Iterable[argparse.Action], argv: list[str], subcommand: str) -> set[str]:
    """The dests of `actions` set on the command line `argv` (`fastft`'s arguments): parsed again with every default
    suppressed. Only the arguments after the first `subcommand` are read (`fastft` itself takes no valued options),
    so a value spelled like the subcommand (--output-dir train) stays a value."""
    probe = argparse.ArgumentParser(add_help=False)
    for action in actions:
        kwargs = {"dest": action.dest, "default": argparse.SUPPRESS}
        if isinstance(action, argparse.BooleanOptionalAction):
            probe.add_argument(*action.option_strings, action=argparse.BooleanOptionalAction, **kwargs)
        elif action.nargs == 0:  # a switch (store_true, store_const, count)
            probe.add_argument(*action.option_strings, action="count", **kwargs)
        else:
            probe.add_argument(*action.option_strings, nargs=action.nargs, **kwargs)
    argv = list(argv)
    known, _ = probe.parse_known_args(argv[argv.index(subcommand) + 1:] if subcommand in argv else argv)
    return set(vars(known))


class ListedOnce(argparse.Action):
    """A list flag (nargs="+") given at most once: argparse's own store kept only the last of `--methods lora
    --methods qlora`, silently dropping lora. A second use is refused, naming the flag, rather than guessed at
    (one reader expects the lists joined, another the later to override)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, self.default) is not self.default:  # a value parsed earlier on this line
            raise argparse.ArgumentError(self, f"given twice; list all its values after one {option_string}")
        setattr(namespace, self.dest, values)
