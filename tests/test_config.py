"""The typed config loader: YAML sources, recipes, overrides, strict validation."""

from dataclasses import dataclass, field

import pytest

from crate.config import flatten, load_config, parse_override
from crate.errors import ConfigError
from crate.model.config import ModelConfig


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
