"""The package's shape: layers that depend only downward, every module of `crate/` listed in one of them; the model
imports torch alone (tests/test_torch_only.py installs and runs the torch-only core); nothing imports the entry
points."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

CRATE = Path(__file__).resolve().parents[1] / "crate"
ORCHESTRATION = ("ray", "deepspeed", "mlflow")

# The layers, lowest first, and every module of crate/ in one of them. A module may import modules of lower layers,
# and modules of its own layer only inside its own package (`crate.data.*` among themselves; the top-level
# foundation modules among themselves). A new module is added here, in the layer its imports allow.
LAYERS = {
    "foundation": ["crate", "crate.errors", "crate.files", "crate.retry", "crate.config", "crate.logs",
                   "crate.tokenizer", "crate.plots", "crate.cluster", "crate.objectstore"],
    "model": ["crate.model", "crate.model.__main__", "crate.model.build", "crate.model.checkpoint", "crate.model.config",
              "crate.model.crate", "crate.model.gpt", "crate.model.hooks", "crate.model.lm"],
    "services": ["crate.data", "crate.data.config", "crate.data.documents", "crate.data.packing", "crate.data.ray_engine",
                 "crate.data.reshard", "crate.data.shards", "crate.data.sources", "crate.data.stats", "crate.data.stream",
                 "crate.tracking", "crate.tracking.config", "crate.tracking.job", "crate.tracking.locations",
                 "crate.tracking.provenance", "crate.tracking.tracker"],
    "training": ["crate.train", "crate.train.checkpoint", "crate.train.config", "crate.train.engine", "crate.train.errors",
                 "crate.train.evaluate", "crate.train.launch", "crate.train.loop", "crate.train.metrics",
                 "crate.train.process_group", "crate.train.runtime", "crate.train.schedule",
                 "crate.sae", "crate.sae.activations", "crate.sae.evaluate", "crate.sae.job", "crate.sae.model",
                 "crate.sae.train"],
    "analysis": ["crate.interp", "crate.interp.aggregate", "crate.interp.backends", "crate.interp.backends.base",
                 "crate.interp.backends.hf", "crate.interp.backends.http", "crate.interp.backends.tokenset",
                 "crate.interp.collect", "crate.interp.config", "crate.interp.distributed", "crate.interp.features",
                 "crate.interp.job", "crate.interp.prompts", "crate.interp.protocols", "crate.interp.proxy",
                 "crate.interp.records", "crate.interp.report", "crate.interp.sae_features", "crate.interp.schema",
                 "crate.interp.scoring", "crate.interp.sites", "crate.interp.store", "crate.interp.subject",
                 "crate.interop", "crate.interop.export", "crate.interop.hf", "crate.interop.lens"],
    "studies": ["crate.sweep", "crate.sweep.config", "crate.sweep.report", "crate.sweep.run", "crate.sweep.runs",
                "crate.sweep.state", "crate.sweep.trial",
                "crate.results", "crate.results.compare", "crate.results.steering", "crate.results.tables",
                "crate.results.viewer", "crate.results.viewer.build"],
    "bench": ["crate.bench", "crate.bench.data", "crate.bench.interp", "crate.bench.train"],
    "cli": ["crate.cli"],
    "ops": ["crate.ops", "crate.ops.config", "crate.ops.raynode", "crate.ops.stack"],
}
LAYER_OF = {module: rank for rank, modules in enumerate(LAYERS.values()) for module in modules}
# "module:attribute" strings that a registry resolves lazily (interp's features and backends): imports too.
POINTER = re.compile(r"^(crate(?:\.\w+)+)(?::\w+)?$")


def module_name(path: Path) -> str:
    parts = path.relative_to(CRATE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, module: str | None = None) -> set[str]:
    """Every module that `path` (the module named `module`) imports, at the top or inside functions, relative
    imports resolved, plus the modules its "crate.x:attr" registry strings point at."""
    tree = ast.parse(path.read_text())
    module = module or module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            names.add(".".join([*base, *([node.module] if node.module else [])]))
            if node.module is None or node.level:  # `from . import x`: x may be a module
                names.update(".".join([*base, *([node.module] if node.module else []), a.name]) for a in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and (match := POINTER.match(node.value)):
            names.add(match.group(1))
    return names


def crate_module(name: str) -> str | None:
    """The listed module `name` is or lies in (`crate.model.build.build_model` -> `crate.model.build`)."""
    while name and name not in LAYER_OF:
        name = name.rpartition(".")[0]
    return name or None


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2]) if module.count(".") and module not in LAYERS["foundation"] + ["crate.cli"] \
        else "crate"


def test_every_module_is_in_the_layer_table():
    modules = {module_name(path) for path in CRATE.rglob("*.py")}
    assert not modules - LAYER_OF.keys(), f"modules missing from LAYERS: {sorted(modules - LAYER_OF.keys())}"
    assert not LAYER_OF.keys() - modules, f"LAYERS lists modules that do not exist: {sorted(LAYER_OF.keys() - modules)}"
    assert len(LAYER_OF) == sum(map(len, LAYERS.values())), "a module is listed in two layers"


def test_every_import_points_down_the_layers():
    layer_names = list(LAYERS)
    wrong = []
    for path in CRATE.rglob("*.py"):
        source = module_name(path)
        for name in imported_modules(path):
            target = crate_module(name) if name.split(".")[0] == "crate" else None
            if target is None or target == source:
                continue
            below = LAYER_OF[target] < LAYER_OF[source]
            beside = LAYER_OF[target] == LAYER_OF[source] and package_of(target) == package_of(source)
            if not (below or beside):
                wrong.append(f"{source} ({layer_names[LAYER_OF[source]]}) imports {target} "
                             f"({layer_names[LAYER_OF[target]]})")
    assert not wrong, "\n".join(sorted(wrong))


def test_the_layer_check_sees_function_level_relative_and_registry_imports(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from crate.cli import run_job\n    from ..train import launch\n"
                     "FEATURES = {'sae': 'crate.sae.features:SAEFeatures'}\n")
    assert {"crate.cli", "crate.train", "crate.sae.features"} <= imported_modules(probe, "crate.interp.probe")


def test_the_model_imports_only_torch_and_itself():
    for path in (CRATE / "model").glob("*.py"):
        for name in imported_modules(path):
            top = name.split(".")[0]
            assert top not in ORCHESTRATION, f"{path.name} imports {name}"
            if top == "crate":
                assert name.startswith(("crate.model", "crate.errors", "crate.files")), f"{path.name} imports {name}"


def test_nothing_in_the_package_imports_the_entry_points():
    for path in CRATE.rglob("*.py"):
        for name in imported_modules(path):
            assert name.split(".")[0] not in ("jobs", "tune"), f"{path} imports {name}"


@pytest.mark.integration
def test_platform_is_not_an_importable_package():
    out = subprocess.run([sys.executable, "-c", "import platform; print(platform.python_version())"],
                         cwd=CRATE.parent, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip().count(".") == 2, out.stderr
    assert not list((CRATE.parent / "platform").glob("*.py"))
