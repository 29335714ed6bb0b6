"""Where a `fastft train` run's settings come from: its command-line flags and its YAML file.

Every TrainConfig field is a flag (`--grad-accum` for `grad_accum`) and a YAML key (`grad_accum: 4`); flags given
on the command line override the file, the file overrides the defaults. A YAML key that is unknown, given twice or
of the wrong type is a ConfigError naming it.
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import types
import typing
from pathlib import Path

from fastft.apps.given_flags import ListedOnce, given_dests
from fastft.apps.training.config import (CHOICES, FIELD_TYPES, FIELDS, HELP, HELP_GROUPS, TUPLE_FIELDS, ConfigError,
                                         TrainConfig, flag, unreadable)


def _base_type(name: str):
    t = FIELD_TYPES[name]
    args = [a for a in typing.get_args(t) if a is not type(None)]
    return args[0] if typing.get_origin(t) in (typing.Union, types.UnionType) else t  # `X | None` -> X


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, grouped, each with help and its default shown."""
    defaults = TrainConfig()
    parser.add_argument("--config", metavar="YAML", default=None,
                        help="read settings from a YAML file (keys are the flag names with underscores); "
                             "flags given on the command line override it")
    assert set(sum(HELP_GROUPS.values(), ())) == set(FIELDS), "every field belongs to one help group"
    for title, names in HELP_GROUPS.items():
        group = parser.add_argument_group(title)
        for name in names:
            default = getattr(defaults, name)
            kind = _base_type(name)
            kwargs = {"default": default, "help": HELP[name], "dest": name}
            if kind is bool:
                group.add_argument(flag(name), action=argparse.BooleanOptionalAction, **kwargs)
                continue
            if typing.get_origin(kind) is tuple:
                kwargs.update(nargs="+", default=list(default), metavar="NAME", action=ListedOnce)
            else:
                kwargs["type"] = kind
            if name in CHOICES:
                kwargs["choices"] = CHOICES[name]
            group.add_argument(flag(name), **kwargs)
    # argparse (3.11) takes "-1e-3" for a flag ("--lr: expected one argument"), "-0.001" for a value: negative
    # numbers in exponent form too, so that the value's own check says what is wrong with it
    if hasattr(parser, "_negative_number_matcher"):
        parser._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _coerce(name: str, value, source: str):
    """A YAML value as the field's type, or a ConfigError naming the key."""
    kind = _base_type(name)
    optional = type(None) in typing.get_args(FIELD_TYPES[name])
    if value is None and optional:
        return None
    if kind is str and isinstance(value, bool) and name in CHOICES:
        return _choice_from_yaml_bool(name, value, source)
    try:
        if kind is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if typing.get_origin(kind) is tuple:
            if not isinstance(value, (str, list, tuple)):  # a mapping's keys are no module list
                raise TypeError
            items = [value] if isinstance(value, str) else list(value)
            if not all(isinstance(x, str) for x in items):
                raise TypeError
            return tuple(items)
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise TypeError
        if kind is float and isinstance(value, str):  # YAML 1.1 reads 2e-4 (no dot) as a string
            return float(value)
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError
        if kind is str and not isinstance(value, str):
            raise TypeError
        return kind(value)
    except (TypeError, ValueError):
        want = "a list of names" if typing.get_origin(kind) is tuple else kind.__name__
        raise ConfigError(f"{source}: key '{name}' must be {want}, got {value!r}") from None


# YAML 1.1 reads these bare words as booleans (any case)
_YAML_BOOL_WORDS = {True: ("on", "yes", "true"), False: ("off", "no", "false")}


def _choice_from_yaml_bool(name: str, value: bool, source: str) -> str:
    """The choice a bare YAML word stood for (`compile: off` reads as False): the one choice among the words YAML
    turns into `value`; else a ConfigError saying to quote it."""
    spelled = [c for c in CHOICES[name] if c in _YAML_BOOL_WORDS[value]]
    if len(spelled) == 1:
        return spelled[0]
    raise ConfigError(f"{source}: key '{name}' must be one of {', '.join(CHOICES[name])}, got the boolean {value} "
                      "(YAML reads a bare on/off/yes/no/true/false as one); quote the value, e.g. "
                      f"{name}: \"{CHOICES[name][0]}\"")


class _KeyGivenTwice(Exception):
    def __init__(self, key, line: int):
        super().__init__(key, line)
        self.key, self.line = key, line


def _yaml_load_unique_keys(text: str):
    """yaml.safe_load, but a mapping's key given twice raises _KeyGivenTwice (PyYAML keeps the last one silently:
    `lr: 1e-4` then `lr: 3e-4` further down trained at 3e-4 with no word)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:  # an unhashable key: PyYAML's own error (not valid YAML) below
                    continue
                if key in seen:
                    raise _KeyGivenTwice(key, key_node.start_mark.line + 1)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader)


def read_yaml_config(path: str | os.PathLike) -> dict:
    """{field: value} from a YAML file; unknown keys, keys given twice and wrong types are ConfigErrors naming the
    key."""
    import yaml

    path = Path(path)
    try:
        if not path.is_file():  # is_file raises where a folder on the way may not be searched
            raise ConfigError(f"--config {path}: file not found")
        data = _yaml_load_unique_keys(path.read_text(encoding="utf-8"))
        data = {} if data is None else data  # an empty file; a lone 0 / false / [] is refused below
    except _KeyGivenTwice as e:
        raise ConfigError(f"--config {path}: key '{e.key}' is given twice (again at line {e.line}); keep one") \
            from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not UTF-8 text; save the file as UTF-8") from None
    except OSError as e:  # permissions, a failing disk: one line, not a traceback
        raise ConfigError(f"--config {unreadable(path, e)}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings, got {type(data).__name__}")
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            close = difflib.get_close_matches(name, list(FIELDS), n=1)
            raise ConfigError(f"--config {path}: unknown key '{key}' (keys are `fastft train` flag names with "
                              f"underscores{f'; did you mean {close[0]}?' if close else ', e.g. save_every'})")
        if name in values:  # save-every and save_every in one file: which one counts would be silent
            raise ConfigError(f"--config {path}: key '{name}' is given twice (spelled with dashes or underscores); "
                              "keep one")
        values[name] = _coerce(name, value, f"--config {path}")
        if name in CHOICES and values[name] is not None and values[name] not in CHOICES[name]:
            raise ConfigError(f"--config {path}: key '{name}' must be one of {', '.join(CHOICES[name])}, "
                              f"got {values[name]!r}")
    return values


def config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace, argv) -> TrainConfig:
    """Defaults < YAML file < flags given on the command line."""
    values = {name: getattr(args, name) for name in FIELDS}
    if args.config is not None:  # --config "" is a missing file, not no file
        explicit = given_dests([a for a in parser._actions if a.dest in FIELDS], argv, "train")  # noqa: SLF001
        for name, value in read_yaml_config(args.config).items():
            if name not in explicit:
                values[name] = value
    for name in TUPLE_FIELDS:
        values[name] = tuple(values[name])
    return TrainConfig(**values)


