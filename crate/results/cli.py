"""Command lines of the research tools (steer, train_sae, compare, view): the shared `--config` + `key=value`
parser of `crate.cli`, plus flags that are shorthand for overrides, e.g. `--layer 3 --neuron 5,7` means
`layer=3 neurons=[5,7]`. Flags and overrides resolve into one validated config, so `--print-config` shows
what a command line means."""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from typing import Literal, Sequence, TypeVar

from crate.cli import config_parser, parse_config

T = TypeVar("T")
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*=")


@dataclass(frozen=True)
class Flag:
    name: str  # "--layer"
    field: str  # the dotted config field it sets
    help: str
    kind: Literal["text", "number", "texts", "numbers"] = "number"  # plurals: comma-separated and/or repeated
    metavar: str | None = None


def parse_tool_config(cls: type[T], description: str, flags: Sequence[Flag], argv: Sequence[str] | None = None,
                      positional: str | None = None) -> T:
    """The validated config of a command line. With `positional`, arguments that are not `key=value` fill
    that list field (e.g. the results tables of `compare.py RESULTS...`)."""
    parser = config_parser(cls, description)
    group = parser.add_argument_group("shorthand flags (each sets the config field named in brackets)")
    for flag in flags:
        group.add_argument(flag.name, dest=_dest(flag), action="append", default=argparse.SUPPRESS,
                           metavar=flag.metavar or flag.field.split(".")[-1].upper(), help=f"{flag.help} [{flag.field}]")
    args = parser.parse_intermixed_args(argv)  # flags may come between positional arguments
    overrides = [_override(flag, getattr(args, _dest(flag))) for flag in flags if hasattr(args, _dest(flag))]
    rest = list(args.overrides)
    if positional:
        items = [a for a in rest if not OVERRIDE.match(a)]
        rest = [a for a in rest if OVERRIDE.match(a)]
        if items:
            overrides.append(f"{positional}={json.dumps(items)}")
    resolved = (["--config", args.config] if args.config else []) + (["--print-config"] if args.print_config else [])
    config, _ = parse_config(cls, description, resolved + ["--", *overrides, *rest], parser=parser)
    return config


def _dest(flag: Flag) -> str:
    return "flag_" + flag.name.lstrip("-").replace("-", "_")


def _override(flag: Flag, values: list[str]) -> str:
    """A flag's values as one override whose value YAML reads back exactly (text is JSON-quoted)."""
    if flag.kind in ("texts", "numbers"):
        items = [item.strip() for value in values for item in value.split(",") if item.strip()]
        return f"{flag.field}={json.dumps(items) if flag.kind == 'texts' else '[' + ', '.join(items) + ']'}"
    value = values[-1]  # a repeated scalar flag: the last one wins, as with overrides
    return f"{flag.field}={json.dumps(value) if flag.kind == 'text' else value}"
