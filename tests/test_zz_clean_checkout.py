"""The suite leaves the checkout as it found it (runs last: pytest collects test files in name order).

The snapshot is taken when this module is collected, which is before any test runs; the test compares the
checkout after every other test: `git status --porcelain --ignored` (new, changed or deleted files, ignored ones
included) and the content of every untracked or ignored entry (a test writing into an `mlruns/` that existed
already changes no status line). Python's caches and the installed environment are not the tests' doing."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_THE_TESTS = ("__pycache__", ".pytest_cache", ".venv", ".egg-info")


def _ours(path: str) -> bool:
    return not any(part in path for part in NOT_THE_TESTS)


def checkout_state() -> dict[str, object]:
    status = subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=ROOT, capture_output=True, text=True,
                            check=True, timeout=60).stdout.splitlines()
    state: dict[str, object] = {}
    for line in status:
        path = line[3:].strip('"')
        if not _ours(path):
            continue
        target = ROOT / path
        files = [target] if target.is_file() else [Path(d) / f for d, _, names in os.walk(target) for f in names]
        state[line] = sorted((str(f.relative_to(ROOT)), f.stat().st_size, f.stat().st_mtime_ns)
                             for f in files if _ours(str(f)) and f.exists())
    return state


BEFORE = checkout_state()


def test_the_suite_leaves_nothing_in_the_checkout():
    after = checkout_state()
    changed = {line: files for line, files in after.items() if BEFORE.get(line) != files}
    gone = [line for line in BEFORE if line not in after]
    assert not changed and not gone, (f"tests wrote into the checkout {ROOT}: "
                                      f"{ {line: files[:5] for line, files in changed.items()} }; removed: {gone}")
