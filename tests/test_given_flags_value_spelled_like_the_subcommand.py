"""fastft.apps.given_flags.given_dests reads the flags after the FIRST occurrence of the subcommand: a later value
spelled like it (`fastft train --output-dir train --lr 0.1`) is a value, and the flags before it still count as given
(else the YAML's value would win over the command line's for them)."""
import argparse

from fastft.apps.given_flags import given_dests


def _actions():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", default="out")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--methods", nargs="+", default=["lora"])
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--epochs", type=int, default=1)
    return [a for a in parser._actions if a.dest != "help"]  # noqa: SLF001


def test_a_value_spelled_like_the_subcommand_stays_a_value():
    argv = ["train", "--output-dir", "train", "--methods", "lora", "train", "--lr", "0.1"]
    assert given_dests(_actions(), argv, "train") == {"output_dir", "methods", "lr"}


def test_flags_given_at_their_default_values_count_as_given():
    argv = ["train", "--epochs", "1", "--no-compile", "--quiet"]
    assert given_dests(_actions(), argv, "train") == {"epochs", "compile", "quiet"}
    assert given_dests(_actions(), ["train"], "train") == set()
