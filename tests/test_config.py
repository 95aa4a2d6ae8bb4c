"""The typed config loader: YAML sources, recipes, overrides, strict validation, field help and bounds."""

import ast
import dataclasses
import importlib
import importlib.util
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import pytest

from crate.cli import describe_fields
from crate.config import Range, field_help, flatten, load_config, parse_override
from crate.errors import ConfigError
from crate.model.config import ModelConfig
from crate.train.config import PretrainConfig

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Inner:
    rate: float = 0.1
    names: list[str] = field(default_factory=list)


@dataclass
class Outer:
    steps: int = 10
    inner: Inner = field(default_factory=Inner)
    model: ModelConfig = field(default_factory=ModelConfig)


def test_overrides_are_typed_and_nested():
    cfg = load_config(Outer, None, ["steps=20", "inner.rate=1e-3", "inner.names=[a, b]", "model.preset=crate-2l",
                                    "model.ista_sparsity=0.05"])
    assert cfg.steps == 20 and cfg.inner.rate == 0.001 and cfg.inner.names == ["a", "b"]
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.ista_sparsity) == (2, 128, 0.05)
    assert flatten(cfg)["inner.rate"] == 0.001


def test_yaml_files_chain_through_base(tmp_path):
    (tmp_path / "base.yaml").write_text("steps: 5\ninner:\n  rate: 0.5\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ninner:\n  names: [x]\n")
    cfg = load_config(Outer, tmp_path / "child.yaml")
    assert cfg.steps == 5 and cfg.inner.rate == 0.5 and cfg.inner.names == ["x"]


@pytest.mark.parametrize("override, field_path", [
    ("stepz=1", "stepz"), ("steps=many", "steps"), ("inner.rate=[1]", "inner.rate"),
    ("model.n_head=5", "model.n_head"), ("model.preset=crate-99l", "model.preset"),
])
def test_bad_values_name_their_field(override, field_path):
    with pytest.raises(ConfigError) as error:
        load_config(Outer, None, [override])
    assert error.value.field == field_path


def test_unknown_recipe_and_malformed_override():
    with pytest.raises(ConfigError, match="neither a YAML file nor a recipe"):
        load_config(Outer, "no-such-recipe")
    with pytest.raises(ConfigError, match="dotted.key=value"):
        parse_override("steps")


def test_help_shows_nested_defaults_from_their_factories():
    """`--help` lists the defaults a user gets, including a nested config built by a factory with its own
    settings (the interpretability job's Anthropic collection: 800 blocks of 8-token windows)."""
    from crate.cli import describe_fields
    from crate.interp.config import InterpConfig

    lines = describe_fields(InterpConfig)
    assert "anthropic_records.blocks = 800" in lines and "anthropic_records.window = 8" in lines
    assert "records.blocks = 8000" in lines and "records.window = 64" in lines


# ---- bad input: every one a ConfigError naming its field, at load time (issue 13, items 4 and 13) -----------


@pytest.mark.parametrize("override, field_path", [
    ("model.ista_step_size=nan", "model.ista_step_size"), ("model.ista_sparsity=nan", "model.ista_sparsity"),
    ("model.ista_sparsity=.nan", "model.ista_sparsity"), ("train.optim.lr=inf", "train.optim.lr"),
    ("train.optim.lr=nan", "train.optim.lr"), ("train.optim.grad_clip=nan", "train.optim.grad_clip"),
    ("train.optim.min_lr=-inf", "train.optim.min_lr"), ("model.dropout=-.inf", "model.dropout"),
    ("train.peak_flops=inf", "train.peak_flops"),  # an optional float too
])
def test_non_finite_floats_are_refused_by_name(override, field_path):
    from crate.train.config import PretrainConfig

    with pytest.raises(ConfigError) as error:
        load_config(PretrainConfig, "quickstart", [override])
    assert error.value.field == field_path and "finite" in error.value.message


def test_a_base_cycle_is_named(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\nsteps: 1\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nsteps: 2\n")
    with pytest.raises(ConfigError) as error:
        load_config(Outer, tmp_path / "a.yaml")
    assert error.value.field == "base" and "cycle" in error.value.message and "a.yaml" in error.value.message


@pytest.mark.parametrize("base", ["[1, 2]", "{x: 1}", "7"])
def test_a_base_that_is_not_one_source_is_named(tmp_path, base):
    (tmp_path / "c.yaml").write_text(f"base: {base}\nsteps: 1\n")
    with pytest.raises(ConfigError) as error:
        load_config(Outer, tmp_path / "c.yaml")
    assert error.value.field == "base"


def test_non_utf8_yaml_is_named(tmp_path):
    (tmp_path / "latin.yaml").write_bytes("steps: 3  # réglage\n".encode("latin-1"))
    with pytest.raises(ConfigError) as error:
        load_config(Outer, tmp_path / "latin.yaml")
    assert error.value.field == "config" and "UTF-8" in error.value.message and "line 1" in error.value.message


def test_duplicate_yaml_keys_are_refused(tmp_path):
    (tmp_path / "dup.yaml").write_text("steps: 3\ninner:\n  rate: 0.1\n  rate: 0.2\n")
    with pytest.raises(ConfigError) as error:
        load_config(Outer, tmp_path / "dup.yaml")
    assert error.value.field == "inner.rate" and "twice" in error.value.message and "lines 3 and 4" in error.value.message
    (tmp_path / "ok.yaml").write_text("steps: 3\ninner: {rate: 0.1}\nother: {rate: 0.2}\n")  # same key, other map
    with pytest.raises(ConfigError, match="unknown field"):
        load_config(Outer, tmp_path / "ok.yaml")


@pytest.mark.parametrize("name", ["../escape", "a/b", "/abs", "..", ".hidden", "a\\b", "x" * 300])
def test_run_names_that_are_not_one_folder_are_refused(name):
    from crate.train.config import PretrainConfig

    with pytest.raises(ConfigError) as error:
        load_config(PretrainConfig, "quickstart", [f"train.run_name={name}"])
    assert error.value.field == "train.run_name"


def test_an_empty_run_name_still_means_automatic():
    from crate.train.config import PretrainConfig

    assert load_config(PretrainConfig, "quickstart", ["train.run_name="]).train.run_name == ""
    assert load_config(PretrainConfig, "quickstart", ["train.run_name=crate-tiny_v2.1"]).train.run_name


def test_an_absurd_block_size_is_refused_before_anything_is_allocated():
    with pytest.raises(ConfigError) as error:
        load_config(Outer, None, ["model.block_size=1000000000"])
    assert error.value.field == "model.block_size" and "65536" in error.value.message


@pytest.mark.parametrize("override, suggestion", [
    ("train.max_step=5", "train.max_steps"), ("model.ista_sparsty=0.1", "model.ista_sparsity"),
    ("trian.max_steps=5", "train"),
])
def test_unknown_keys_suggest_the_closest_field(override, suggestion):
    from crate.train.config import PretrainConfig

    with pytest.raises(ConfigError) as error:
        load_config(PretrainConfig, "quickstart", [override])
    assert f"did you mean {suggestion}?" in error.value.message


# ---- field help and bounds, declared beside the field (issue 14, item 3) ------------------------------------


def job_configs() -> dict[str, type]:
    """{script: the config class its command line parses}, read from each job's parse_config/config_parser call."""
    scripts = sorted([*REPO.glob("jobs/*.py"), REPO / "tune" / "sweep.py", REPO / "crate" / "ops" / "stack.py"])
    found = {}
    for script in scripts:
        calls = [node for node in ast.walk(ast.parse(script.read_text())) if isinstance(node, ast.Call)
                 and getattr(node.func, "id", None) in ("parse_config", "config_parser")]
        spec = importlib.util.spec_from_file_location(f"job_{script.stem}", script)
        module = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
        spec.loader.exec_module(module)
        (name,) = {call.args[0].id for call in calls}
        found[script.relative_to(REPO).as_posix()] = getattr(module, name)
    return found


def every_field(cls: type, prefix: str = ""):
    """(dotted name, its class, the field) for every field, sections and their fields alike."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield f"{prefix}{f.name}", cls, f
        if dataclasses.is_dataclass(hints[f.name]):
            yield from every_field(hints[f.name], f"{prefix}{f.name}.")


def test_every_field_of_every_jobs_config_has_help_and_help_shows_it():
    configs = job_configs()
    assert len(configs) == 16 and {"jobs/pretokenize.py", "crate/ops/stack.py", "tune/sweep.py"} <= set(configs)
    missing = [f"{script}: {name}" for script, cls in configs.items() for name, owner, f in every_field(cls)
               if not field_help(owner)[f.name]]
    assert not missing, "fields without help (a comment beside the field):\n" + "\n".join(missing)
    lines = describe_fields(configs["jobs/pretrain.py"])
    at = lines.index("data.context = 1024")
    assert lines[at + 1] == "    tokens per training example; a block holds context+1 tokens (>= 1)"
    assert "data: the corpora and how they become blocks" in lines


@dataclass
class Commented:
    # what the field above a field says,
    # over two lines
    above: int = 1
    beside: Annotated[float, Range(0, 1, exclusive_high=True)] = 0.5  # the comment beside it
    plain: str = ""


def test_field_help_is_the_comment_beside_the_field_or_the_lines_above_it():
    assert field_help(Commented) == {"above": "what the field above a field says, over two lines",
                                     "beside": "the comment beside it", "plain": ""}


@pytest.mark.parametrize("cls, overrides, field_path, message", [
    ("crate.data.config:DataConfig", ["context=0"], "context", "must be >= 1, got 0"),
    ("crate.train.config:PretrainConfig", ["train.optim.lr=0"], "train.optim.lr", "must be > 0, got 0.0"),
    ("crate.train.config:PretrainConfig", ["train.optim.beta2=1"], "train.optim.beta2", "must be in [0, 1), got 1.0"),
    ("crate.ops.config:StackConfig", ["mlflow.port=70000"], "mlflow.port", "must be in [1, 65535], got 70000"),
    ("crate.sae.job:TrainSAEConfig", ["checkpoint=x.pt", "layer=0", "sae.resample_at=[5, 0]"], "sae.resample_at[1]",
     "must be >= 1, got 0"),
    ("crate.interp.config:InterpConfig", ["checkpoint=x.pt", "sample=0"], "sample", "must be >= 1, got 0"),
    ("crate.data.config:PretokenizeConfig", ["corpus=c", "out=o", "shard_bytes=-1"], "shard_bytes",
     "must be >= 1, got -1"),
])
def test_a_bound_violation_names_the_field_and_the_bound(cls, overrides, field_path, message):
    module, name = cls.split(":")
    with pytest.raises(ConfigError) as error:
        load_config(getattr(importlib.import_module(module), name), None, overrides)
    assert (error.value.field, error.value.message) == (field_path, message)


def test_a_bound_passes_an_optional_field_left_unset_and_names_its_symbol():
    assert load_config(PretrainConfig, "smoke", ["train.max_tokens=null"]).train.max_tokens is None
    with pytest.raises(ConfigError, match="^x: λ must be >= 0, got -1$"):
        Range(0, symbol="λ").check("x", -1)
