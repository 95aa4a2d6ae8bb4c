"""The command line every job shares: `--config SOURCE`, `dotted.key=value` overrides, and optional shorthand
flags that are nothing but overrides (`--layer 3 --neuron 5,7` means `layer=3 neurons=[5,7]`). Flags and
overrides resolve into one validated config, so `--print-config` shows what a command line means.

Every job ends with `sys.exit(run_job(main))`: bad input, a `ConfigError` whether the config loader or the job's
own pre-flight checks (a corpus that does not exist, a checkpoint that is not there) raise it, is one line naming
the dotted field on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from crate.config import Flag, dump_yaml, field_bounds, field_help, list_recipes, load_config
from crate.errors import ConfigError

T = TypeVar("T")
# The import names of pyproject.toml's `cluster` extra (Ray, DeepSpeed, MLflow and the rest of the orchestration
# stack), which `pip install -e .` leaves out; tests/test_torch_only.py holds this list to the extra.
CLUSTER_MODULES = ("ray", "deepspeed", "mlflow", "optuna", "requests", "scipy", "transformers", "psutil")
OVERRIDE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*=")


def config_parser(cls: type, description: str, default_source: str | None = None, flags: Sequence[Flag] = (),
                  commands: Sequence[str] = (), prog: str | None = None) -> argparse.ArgumentParser:
    """The job's parser. `commands`: a first argument naming what to do (the stack's up, down, status)."""
    bare = _built(lambda: load_config(cls, default_source)) if default_source else None
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="overrides are dotted.key=value (e.g. train.max_steps=100). Fields, the values a bare run uses"
               + (f" (from {default_source})" if bare is not None else "") + ", what they mean and their bounds:\n"
               + "\n".join(f"  {line}" for line in describe_fields(cls, defaults=bare))
               + f"\nrecipes: {', '.join(list_recipes())}",
    )
    if commands:
        parser.add_argument("command", choices=list(commands))
    parser.add_argument("--config", default=default_source,
                        help=f"YAML file or recipe name (default: {default_source or 'built-in defaults'})")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    if flags:
        group = parser.add_argument_group("shorthand flags (each sets the config field named in brackets)")
        for flag in flags:
            if flag.kind == "switch":
                group.add_argument(flag.name, dest=flag.dest, action="append_const", const="true",
                                   default=argparse.SUPPRESS, help=f"{flag.help} [{flag.field}=true]")
                continue
            group.add_argument(flag.name, dest=flag.dest, action="append", default=argparse.SUPPRESS,
                               metavar=flag.metavar or flag.field.split(".")[-1].upper(),
                               help=f"{flag.help} [{flag.field}]")
    return parser


def parse_config(cls: type[T], description: str, argv: Sequence[str] | None = None,
                 default_source: str | None = None, flags: Sequence[Flag] = (),
                 positional: str | Sequence[str] | None = None,
                 parser: argparse.ArgumentParser | None = None) -> tuple[T, argparse.Namespace]:
    """Parse argv into a validated config; a bad config exits with status 2 and a message naming the field.

    With `positional`, arguments that are not `key=value` fill fields: one name, a list field takes them all
    (`compare.py RESULTS...`); several names, one field each, in order (`pretokenize.py CORPUS OUT`).
    """
    parser = parser or config_parser(cls, description, default_source, flags)
    args = parser.parse_intermixed_args(argv)  # flags may come between positional arguments
    overrides = [flag.override(getattr(args, flag.dest)) for flag in flags if hasattr(args, flag.dest)]
    rest = list(args.overrides)
    if positional:
        items = [a for a in rest if not OVERRIDE.match(a)]
        rest = [a for a in rest if OVERRIDE.match(a)]
        overrides += positional_overrides(parser, positional, items)
    try:
        config = load_config(cls, args.config, overrides + rest)
    except ConfigError as error:
        parser.exit(2, error_line(parser.prog, error))
    if args.print_config:
        sys.stdout.write(dump_yaml(config))
        parser.exit(0)
    return config, args


def positional_overrides(parser: argparse.ArgumentParser, fields: str | Sequence[str], items: list[str]) -> list[str]:
    """The overrides that positional `items` stand for (JSON-quoted, so YAML reads each back as the text given)."""
    if isinstance(fields, str):
        return [f"{fields}={json.dumps(items)}"] if items else []
    if len(items) > len(fields):
        parser.exit(2, f"{parser.prog}: error: {len(items)} arguments where {' '.join(f.upper() for f in fields)} "
                       f"are expected: {' '.join(items)}\n")
    return [f"{name}={json.dumps(item)}" for name, item in zip(fields, items)]


def run_job(main: Callable[[], int | None]) -> int:
    """A job's exit status: `main()`'s (0 for None); a ConfigError that escapes it is one line and status 2, and
    so is a part of the orchestration stack that a torch-only install lacks (naming the extra that brings it)."""
    prog = Path(sys.argv[0]).name
    try:
        return main() or 0
    except ConfigError as error:
        sys.stderr.write(error_line(prog, error))
        return 2
    except ModuleNotFoundError as error:
        missing = (error.name or "").split(".")[0]
        if missing not in CLUSTER_MODULES:
            raise
        sys.stderr.write(f"{prog}: error: this needs {missing}, which the torch-only install leaves out; install "
                         "the orchestration stack with: pip install -e '.[cluster]'\n")
        return 2


def error_line(prog: str, error: ConfigError) -> str:
    """`prog: error: dotted.field: message`, on one line whatever the message holds."""
    return f"{prog}: error: {' '.join(str(error).split())}\n"


def describe_fields(cls: type, prefix: str = "", defaults: Any = None) -> list[str]:
    """`dotted.name = default` for every leaf field, then its meaning and bounds (indented; a section's meaning
    heads its fields). Defaults are read from default instances where they can be built, so that a nested
    config's own default (a factory with other settings than its class's) is what is shown."""
    defaults = defaults if defaults is not None else _built(cls)
    lines = []
    hints, meanings, bounds = typing.get_type_hints(cls), field_help(cls), field_bounds(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        value = getattr(defaults, f.name) if defaults is not None else _built(lambda: _default(f))
        meaning = meanings[f.name] + (f" ({bounds[f.name].describe()})" if f.name in bounds else "")
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(f"{name}: {meaning}")
            lines.extend(describe_fields(hints[f.name], f"{name}.", value))
            continue
        if isinstance(value, dict) and value and all(hasattr(v, "describe") for v in value.values()):
            lines.extend(f"{name}.{key} = {item.describe()}" for key, item in value.items())  # a sweep's space
        else:
            lines.append(f"{name} = {value!r}")
        lines.append(f"    {meaning}")
    return lines


def _built(factory: Any) -> Any:
    try:
        return factory()
    except (TypeError, ConfigError):  # required fields, or defaults that only validate together with others
        return None


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "<required>"


def setup_logging(level: int = logging.INFO) -> None:
    """The job's own lines, library noise filtered (crate/logs.py; CRATE_VERBOSE=1 shows everything)."""
    from crate.logs import configure

    configure(level)
