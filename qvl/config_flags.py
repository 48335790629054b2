"""Dataclass fields <-> argparse flags: a new knob is one field (qvl.config).

`add_dataclass_args(parser, cls)` adds one flag per field; `dataclass_from_args(cls, args)` builds the
dataclass back. Flags have no argparse default: an unset flag is absent from the namespace and the
field's default applies. Field metadata read here:
  help      the help text ("(default: X)" is appended when the default is not None)
  flag      the flag's spelling (default: --field-name); None: no flag for this field
  aliases   more spellings; for a bool, an alias starting with --no- sets False
  choices, metavar   as in argparse
Flag types come from the annotation: int / float / str (X | None is X; a union of several types is
a str the dataclass parses itself); bool is --x / --no-x; list[X] takes comma-separated values and may
be repeated.

Knows nothing about what the fields mean.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing


class _BoolFlag(argparse.Action):
    """--x sets True, --no-x (and every alias starting with --no-) sets False."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not option_string.startswith("--no-"))


def _comma_list(elem: type):
    return lambda s: [elem(x.strip()) for x in s.split(",") if x.strip()]


def _flag_kwargs(f: dataclasses.Field, hint) -> tuple[list[str], dict]:
    meta = f.metadata
    flag = meta.get("flag", "--" + f.name.replace("_", "-"))
    names = [flag, *meta.get("aliases", ())]
    args = [a for a in typing.get_args(hint) if a is not type(None)] \
        if typing.get_origin(hint) in (typing.Union, types.UnionType) else [hint]
    base = args[0] if len(args) == 1 else str
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    help_ = meta.get("help", "")
    kw: dict = {"dest": f.name, "default": argparse.SUPPRESS}
    if base is bool:
        names = [flag, "--no-" + flag[2:], *meta.get("aliases", ())]
        kw["action"] = _BoolFlag
        help_ += f" (default: {'on' if default else 'off'})"
    else:
        if typing.get_origin(base) is list:
            kw.update(action="extend", type=_comma_list((typing.get_args(base) or (str,))[0]))
            help_ += " (comma-separated or repeated)"
        else:
            kw["type"] = base if base in (int, float) else str
        if default is not None and default != []:
            help_ += f" (default: {default})"
        if "choices" in meta:
            kw["choices"] = meta["choices"]
        else:
            kw["metavar"] = meta.get("metavar", flag[2:].upper().replace("-", "_"))
    kw["help"] = help_.strip().replace("%", "%%")
    return names, kw


def add_dataclass_args(parser, cls, *, title: str | None = None):
    """Add one flag per field of dataclass `cls` to `parser` (in an argument group if `title`).

    Returns the parser or group. ValueError if a field's dest is already taken in `parser` (each knob
    is defined once; argparse itself refuses a repeated flag spelling)."""
    target = parser.add_argument_group(title) if title else parser
    taken = {a.dest for a in parser._actions}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("flag", "") is None:
            continue
        if f.name in taken:
            raise ValueError(f"{cls.__name__}.{f.name}: the parser already has a {f.name!r} option")
        names, kw = _flag_kwargs(f, hints[f.name])
        target.add_argument(*names, **kw)
    return target


def dataclass_from_args(cls, args: argparse.Namespace, **overrides):
    """`cls` built from the flags present in `args` (absent ones keep the field defaults) and
    `overrides`; the dataclass's own checks apply."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if f.init and hasattr(args, f.name)}
    return cls(**{**values, **overrides})
