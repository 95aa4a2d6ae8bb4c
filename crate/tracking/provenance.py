"""What produced a run: the code version and the versions of the packages that matter."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

ENV_COMMIT = "CRATE_GIT_COMMIT"  # `ray job submit` does not upload .git: pass the commit in this variable
PACKAGES = ("crate-lm-platform", "torch", "ray", "deepspeed", "mlflow", "tiktoken", "numpy", "pyarrow", "polars")


def code_version() -> str:
    """$CRATE_GIT_COMMIT, else the checkout's HEAD (with `-dirty` for uncommitted changes), else 'unknown'."""
    if os.environ.get(ENV_COMMIT):
        return os.environ[ENV_COMMIT]
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{commit}-dirty" if dirty else commit
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
