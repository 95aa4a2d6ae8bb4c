"""Every job's command line as a user types it, each in its own process: `--help` works, and bad input is one
line on stderr naming the dotted field, exit status 2, no traceback, before any work (issue 18, item 5).

The processes run concurrently (each one spends most of its time importing torch and Ray)."""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration  # every job as a subprocess

REPO = Path(__file__).parents[1]
JOBS = sorted(p.relative_to(REPO).as_posix() for p in [*REPO.glob("jobs/*.py"), REPO / "tune" / "sweep.py"])

# (script, arguments, the field the one line must name, text it must hold); "{tmp}" is a scratch directory.
# One example per kind of check a job runs; the loader's other cases are in test_config.py (in-process).
BAD_INPUTS = [
    ("jobs/pretrain.py", ["data.train=/nonexistent"], "data.train", "no such file"),
    ("jobs/pretrain.py", ["train.max_step=5"], "train.max_step", "did you mean train.max_steps?"),
    ("jobs/pretrain.py", ["train.optim.lr=nan"], "train.optim.lr", "finite"),
    ("jobs/pretrain.py", ["train.run_name=../../escape"], "train.run_name", "names a folder"),
    ("jobs/pretrain.py", ["--config", "{tmp}/a.yaml"], "base", "cycle"),
    ("jobs/pretrain.py", ["data.train={tmp}/columns"], "data.train", "no column 'text'"),
    ("tune/sweep.py", ["trial.data.train=/nonexistent"], "trial.data.train", "no such file"),
    ("tune/sweep.py", ["name=a/b"], "name", "names a folder"),
    ("jobs/interpret.py", ["--checkpoint", "/nonexistent.pt"], "checkpoint", "no checkpoint"),
    ("jobs/train_sae.py", ["--checkpoint", "/nonexistent.pt", "--layer", "0"], "checkpoint", "no model checkpoint"),
    ("jobs/pretokenize.py", ["/nonexistent", "{tmp}/out", "--local"], "corpus", "no such file"),
    ("jobs/reshard.py", ["/nonexistent", "{tmp}/out", "--local"], "corpus", "no such file"),
    ("jobs/reshard.py", ["stdlib://val", "{tmp}/out", "file_bytes=0"], "file_bytes", "must be >= 1, got 0"),
    ("jobs/pretokenize.py", ["stdlib://val"], "out", "missing"),
    ("jobs/benchmark_data.py", ["corpus=/nonexistent"], "corpus", "no such file"),
    ("jobs/benchmark_records.py", ["records.blockz=1"], "records.blockz", "did you mean records.blocks?"),
    ("jobs/corpus_stats.py", ["stdlib://val", "text_field="], "text_field", "record field"),
    ("jobs/corpus_stats.py", [], "paths", "at least one"),
    ("jobs/compare.py", [], "results", "at least one results table"),
    ("jobs/view.py", [], "inputs", "at least one"),
    ("jobs/steer.py", ["--checkpoint", "x.pt", "--layer", "0", "--neuron", "1"], "value", "clamp value"),
    ("jobs/benchmark_hooks.py", ["repeatz=1"], "repeatz", "did you mean repeats?"),
    ("jobs/export.py", ["--checkpoint", "/nonexistent.pt", "--to", "hf", "--output", "{tmp}/out"], "checkpoint",
     "no checkpoint file"),
]


def run(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)  # generous: a loaded 2-core machine runs 6 at once


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """All the processes of this file, run at once: {(script, args...): CompletedProcess}."""
    tmp = tmp_path_factory.mktemp("jobs")
    (tmp / "a.yaml").write_text("base: b.yaml\n")
    (tmp / "b.yaml").write_text("base: a.yaml\n")
    (tmp / "columns").mkdir()
    pq.write_table(pa.Table.from_pylist([{"body": "a document"}]), tmp / "columns" / "part.parquet")
    calls = [(job, ["--help"]) for job in JOBS]
    calls += [(script, [a.replace("{tmp}", str(tmp)) for a in args]) for script, args, _, _ in BAD_INPUTS]
    with ThreadPoolExecutor(max_workers=6) as pool:
        done = list(pool.map(lambda call: run(*call, cwd=tmp), calls))
    return {(script, *args): proc for (script, args), proc in zip(calls, done)}, tmp


def test_every_job_is_covered():
    assert len(JOBS) == 15 and {script for script, *_ in BAD_INPUTS} == set(JOBS) - {"jobs/benchmark.py"}


@pytest.mark.parametrize("job", JOBS)
def test_help_works(results, job):
    proc = results[0][(job, "--help")]
    assert proc.returncode == 0 and "usage:" in proc.stdout and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("script, args, field, text", BAD_INPUTS, ids=[f"{s}:{' '.join(a)}" for s, a, *_ in BAD_INPUTS])
def test_bad_input_is_one_line_naming_the_field_and_exit_2(results, script, args, field, text):
    done, tmp = results
    proc = done[(script, *[a.replace("{tmp}", str(tmp)) for a in args])]
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"{Path(script).name}: error: {field}: ") and text in lines[0], lines[0]
    assert proc.stdout == "" and not list((tmp / "out").glob("*"))  # nothing done, nothing written
