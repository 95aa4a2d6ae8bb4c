"""One way to configure everything: nested dataclasses, loaded from YAML, overridden from the command line,
validated at load time.

    cfg = load_config(PretrainConfig, "crate-2l-pile", ["train.max_steps=100", "model.ista_sparsity=0.05"])

- A source is a YAML path or the name of a recipe shipped in `crate/recipes/` (`crate-2l-pile` ->
  `crate/recipes/crate-2l-pile.yaml`). A YAML file may start from another with `base: <source>`.
- Overrides are `dotted.key=value`; values are parsed as YAML scalars/lists (`1e-4`, `true`, `[a, b]`).
- Unknown keys (with the closest field suggested), wrong types, non-finite floats (NaN, inf) and invalid values
  raise `ConfigError` naming the dotted field, before any work; so do a `base:` cycle, a `base:` that is not one
  source, a file that is not UTF-8 or not YAML, and a key given twice in one mapping.
- A field's meaning is the comment beside it (`field_help`; `--help` prints it with the default), its bounds an
  annotation read here at load time: `context: Annotated[int, Range(1)] = 1024  # tokens per example`.
- A dataclass may define `defaults_for(raw) -> dict` (e.g. ModelConfig's `preset`) and `__post_init__`
  validation of what depends on several fields, raising `ConfigError(field, message)`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import io
import json
import math
import re
import textwrap
import tokenize
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Mapping, Sequence, TypeVar, Union, get_args, get_origin

import yaml

from crate.errors import ConfigError

T = TypeVar("T")
RECIPES_DIR = Path(__file__).parent / "recipes"


def load_config(cls: type[T], source: str | Path | Mapping[str, Any] | None = None,
                overrides: Sequence[str] = ()) -> T:
    """Build a validated `cls` from a YAML path, a recipe name or a dict, then dotted `key=value` overrides."""
    raw = read_source(source) if not isinstance(source, Mapping) else dict(source)
    for override in overrides:
        raw = merge(raw, parse_override(override))
    return from_dict(cls, raw)


def read_source(source: str | Path | None, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The mapping a YAML file or recipe holds, its `base:` chain merged in (`_chain`: the files that led here)."""
    if source is None:
        return {}
    path = source_path(source, "base" if _chain else "config")
    if path.resolve() in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, path.resolve()))
        raise ConfigError("base", f"{_chain[-1]}: a cycle of base files: {cycle}")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError("base", f"{path}: must name one YAML file or recipe, got {base!r}")
        base_path = path.parent / base if (path.parent / base).is_file() else base
        data = merge(read_source(base_path, (*_chain, path.resolve())), data)
    return data


def source_path(source: str | Path, field: str = "config") -> Path:
    """The YAML file of a path or a recipe name; ConfigError on `field` if it is neither."""
    path = Path(source)
    if path.is_file():
        return path
    recipe = RECIPES_DIR / f"{source}.yaml"
    if not recipe.is_file():
        raise ConfigError(field, f"{source!r} is neither a YAML file nor a recipe (recipes: {', '.join(list_recipes())})")
    return recipe


def read_yaml(path: Path) -> dict[str, Any]:
    """The top-level mapping of a UTF-8 YAML file; a key given twice in one mapping is an error, not last-wins."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise ConfigError("config", f"{path} is not UTF-8 text (byte 0x{data[error.start]:02x} on line {line}); "
                                    "save it as UTF-8") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            check_unique_keys(node, path)
        result = loader.construct_document(node) if node is not None else {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError("config", f"{path} is not valid YAML: {problem}{where}") from None
    finally:
        loader.dispose()
    if result is None:
        return {}
    if not isinstance(result, dict):
        raise ConfigError("config", f"{path} must hold a mapping at the top level")
    return result


def check_unique_keys(node: yaml.Node, path: Path, prefix: str = "") -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen:
                raise ConfigError(_join(prefix, key), f"given twice in {path} (lines {seen[key]} and "
                                                      f"{key_node.start_mark.line + 1}); keep one")
            if key is not None:
                seen[key] = key_node.start_mark.line + 1
            check_unique_keys(value_node, path, _join(prefix, key or "?"))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            check_unique_keys(item, path, f"{prefix}[{index}]")


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def parse_override(text: str) -> dict[str, Any]:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(text, "an override must look like dotted.key=value")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    return nest(key.strip(), parsed)


def nest(key: str, value: Any) -> dict[str, Any]:
    """`"a.b.c", v` -> {"a": {"b": {"c": v}}}: the nested mapping a dotted key stands for."""
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else in `update` replaces."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Strictly build dataclass `cls` from `data`; errors carry the dotted path of the field."""
    if not isinstance(data, Mapping):
        raise ConfigError(path or cls.__name__, f"expected a mapping of {cls.__name__} fields, got {data!r}")
    defaults_for = getattr(cls, "defaults_for", None)
    if defaults_for is not None:
        try:
            data = merge(defaults_for(data), data)
        except ConfigError as error:
            raise error.under(path) from None
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), list(fields), n=1)
        hint = f"did you mean {_join(path, close[0])}? " if close else ""
        raise ConfigError(_join(path, unknown[0]), f"unknown field; {hint}{cls.__name__} has: {', '.join(fields)}")
    hints = typing.get_type_hints(cls, include_extras=True)  # with their Range bounds
    kwargs = {name: coerce(value, hints[name], _join(path, name)) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as error:
        raise error.under(path) from None


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def flatten(config: Any, prefix: str = "",
            keep: Callable[[Mapping], bool] = lambda mapping: False) -> dict[str, Any]:
    """{"train.lr": 6e-4, ...}: a config (or mapping) as flat dotted keys (tracking params). A mapping that `keep`
    accepts stays one value (a sweep's dimension). Dotted keys and nested mappings may name the same field (YAML's
    `model.x:` and an override's `model: {x: ...}`): the later one wins and takes the later place."""
    data = to_dict(config) if dataclasses.is_dataclass(config) else config
    flat: dict[str, Any] = {}
    for key, value in data.items():
        dotted = _join(prefix, str(key))
        nested = isinstance(value, Mapping) and not keep(value)
        for leaf, item in (flatten(value, dotted, keep).items() if nested else [(dotted, value)]):
            flat.pop(leaf, None)
            flat[leaf] = item
    return flat


def field_type(cls: type, key: str, what: str = "config") -> Any:
    """The type of the leaf field of dataclass `cls` at the dotted `key`; ConfigError on `key` if there is none."""
    parts = key.split(".")
    for depth, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(cls)}
        if part not in names:
            raise ConfigError(key, f"not a {what} field; {'.'.join(parts[:depth]) or 'the config'} has: "
                                   f"{', '.join(sorted(names))}")
        cls = typing.get_type_hints(cls)[part]
        if dataclasses.is_dataclass(cls) != (depth < len(parts) - 1):
            raise ConfigError(key, "must name a single field, not a section" if depth == len(parts) - 1
                              else f"{part} is a value, not a section")
    return cls


def dump_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def coerce(value: Any, type_: Any, path: str) -> Any:
    """Check/convert one YAML value against a type annotation."""
    origin, args = get_origin(type_), get_args(type_)
    if type_ is Any:
        return value
    if origin is Annotated:
        value = coerce(value, args[0], path)
        for rule in type_.__metadata__:
            if isinstance(rule, Range):
                rule.check(path, value)
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, path)
            except ConfigError as error:
                errors.append(error.message)
        raise ConfigError(path, "; ".join(errors))
    if origin is Literal:
        if value not in args:
            raise ConfigError(path, f"must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(type_):
        return from_dict(type_, value if value is not None else {}, path)
    if origin in (list, tuple, Sequence) or type_ in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            value = [value]
        item = args[0] if args else Any
        items = [coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or type_ is tuple else items
    if origin in (dict, Mapping) or type_ is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(path, f"expected a mapping, got {value!r}")
        item = args[1] if len(args) == 2 else Any
        return {str(k): coerce(v, item, f"{path}.{k}") for k, v in value.items()}
    if type_ is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true/false, got {value!r}")
        return value
    if type_ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(path, f"expected an integer, got {value!r}")
        return value
    if type_ is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(path, f"must be a finite number, got {value!r}")
        return float(value)
    if type_ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(path, f"expected a string, got {value!r}")
        return str(value)
    if isinstance(type_, type) and not isinstance(value, type_):
        raise ConfigError(path, f"expected {type_.__name__}, got {value!r}")
    return value


NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(field: str, name: str) -> None:
    """A name that becomes one folder (a run, a sweep): no path separators, no `..`, no leading dot."""
    if not NAME.match(name):
        raise ConfigError(field, f"{name!r}: use up to 128 letters, digits, '.', '_' and '-', starting with a letter "
                                 "or digit (it names a folder under the storage path)")


@dataclass(frozen=True)
class Range:
    """The bounds of a number field, declared beside it and checked by the loader (None passes: an optional
    field left unset; a list's items are checked one by one). `Range(1)`: >= 1; `Range(0, exclusive_low=True)`:
    > 0; `Range(0, 1, exclusive_high=True)`: in [0, 1). `symbol` names the quantity in the message (λ, η)."""

    low: float | None = None
    high: float | None = None
    exclusive_low: bool = False
    exclusive_high: bool = False
    symbol: str | None = None

    def check(self, field: str, value: Any) -> None:
        if isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                self.check(f"{field}[{index}]", item)
            return
        if value is None or self.contains(value):
            return
        raise ConfigError(field, f"{self.symbol + ' ' if self.symbol else ''}must be {self.describe()}, got {value!r}")

    def contains(self, value: float) -> bool:
        above = self.low is None or (value > self.low if self.exclusive_low else value >= self.low)
        below = self.high is None or (value < self.high if self.exclusive_high else value <= self.high)
        return above and below

    def describe(self) -> str:
        """`>= 1`, `> 0`, `<= 8`, `in [0, 1)`."""
        if self.high is None:
            return f"{'>' if self.exclusive_low else '>='} {self.low:g}"
        if self.low is None:
            return f"{'<' if self.exclusive_high else '<='} {self.high:g}"
        return f"in {'(' if self.exclusive_low else '['}{self.low:g}, {self.high:g}{')' if self.exclusive_high else ']'}"


def field_bounds(cls: type) -> dict[str, Range]:
    """The declared bound of every field of `cls` that has one."""
    bounds = {}
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        rules = [rule for rule in getattr(hint, "__metadata__", ()) if isinstance(rule, Range)]
        if rules:
            bounds[name] = rules[0]
    return bounds


@functools.cache
def field_help(cls: type) -> dict[str, str]:
    """Each field's meaning as its class declares it: the comment on the field's lines, else the comment lines
    right above it ("" where there is none). Inherited fields keep the help of the class that declares them."""
    declared: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            declared.update(_field_comments(klass))
    return {f.name: declared.get(f.name, "") for f in dataclasses.fields(cls)}


def _field_comments(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (a class made at run time)
        return {}
    comments: dict[int, str] = {}
    alone: set[int] = set()  # lines holding nothing but a comment
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            line = token.start[0]
            comments[line] = token.string.lstrip("#").strip()
            if not token.line[:token.start[1]].strip():
                alone.add(line)
    found = {}
    body = ast.parse(source).body[0].body
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        beside = [comments[line] for line in range(node.lineno, node.end_lineno + 1) if line in comments]
        above, line = [], node.lineno - 1
        while line in alone:
            above.insert(0, comments[line])
            line -= 1
        found[node.target.id] = " ".join(beside or above)
    return found


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


@dataclass(frozen=True)
class Flag:
    """A shorthand for one override: `--name VALUE` sets the dotted config `field`."""

    name: str  # "--layer"
    field: str  # the dotted config field it sets
    help: str
    # plurals: comma-separated and/or repeated; switch: a flag without a value that sets the field to true
    kind: Literal["text", "number", "texts", "numbers", "switch"] = "number"
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return "flag_" + self.name.lstrip("-").replace("-", "_")

    def override(self, values: list[str]) -> str:
        """The flag's values as one override that YAML reads back exactly (text is JSON-quoted)."""
        if self.kind in ("texts", "numbers"):
            items = [item.strip() for value in values for item in value.split(",") if item.strip()]
            return f"{self.field}={json.dumps(items) if self.kind == 'texts' else '[' + ', '.join(items) + ']'}"
        value = values[-1]  # a repeated scalar flag: the last one wins, as with overrides
        return f"{self.field}={json.dumps(value) if self.kind == 'text' else value}"
