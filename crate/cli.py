"""The command line every job shares: `--config SOURCE` plus `dotted.key=value` overrides."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from typing import Any, Sequence, TypeVar

from crate.config import dump_yaml, list_recipes, load_config
from crate.errors import ConfigError

T = TypeVar("T")


def config_parser(cls: type, description: str, default_source: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="overrides are dotted.key=value (e.g. train.max_steps=100). Fields and defaults:\n"
               + "\n".join(f"  {line}" for line in describe_fields(cls))
               + f"\nrecipes: {', '.join(list_recipes())}",
    )
    parser.add_argument("--config", default=default_source,
                        help=f"YAML file or recipe name (default: {default_source or 'built-in defaults'})")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser


def parse_config(cls: type[T], description: str, argv: Sequence[str] | None = None,
                 default_source: str | None = None,
                 parser: argparse.ArgumentParser | None = None) -> tuple[T, argparse.Namespace]:
    """Parse argv into a validated config; a bad config exits with status 2 and a message naming the field."""
    parser = parser or config_parser(cls, description, default_source)
    args = parser.parse_args(argv)
    try:
        config = load_config(cls, args.config, args.overrides)
    except ConfigError as error:
        parser.exit(2, f"{parser.prog}: invalid config: {error}\n")
    if args.print_config:
        sys.stdout.write(dump_yaml(config))
        parser.exit(0)
    return config, args


def describe_fields(cls: type, prefix: str = "") -> list[str]:
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            lines.extend(describe_fields(hints[f.name], f"{name}."))
        else:
            lines.append(f"{name} = {_default(f)!r}")
    return lines


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "<required>"


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
