"""Loading a checkpoint never runs code from it (issue 13.2): model, SAE and SAE-trainer files are read as
data, a crafted pickle is refused with an error naming the file, and real layouts still load."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from crate.errors import CheckpointError
from crate.model import build_model, load_model, save_model
from crate.sae.model import load_sae

REPO = Path(__file__).resolve().parents[1]


class _WritesAFile:
    """What an attacker puts in a checkpoint: unpickling it calls `Path.touch` on a file of their choice."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def _crafted(tmp_path: Path, name: str) -> tuple[Path, Path]:
    marker = tmp_path / f"pwned-by-{name}"
    path = tmp_path / name
    torch.save({"format": "crate-lm-checkpoint", "model": {}, "payload": _WritesAFile(marker)}, path)
    return path, marker


def test_a_crafted_model_file_is_refused_and_runs_nothing(tmp_path):
    path, marker = _crafted(tmp_path, "model.pt")
    with pytest.raises(CheckpointError, match="refused") as error:
        load_model(path)
    assert str(path) in str(error.value)
    assert not marker.exists()


def test_a_crafted_sae_file_is_refused_and_runs_nothing(tmp_path):
    path, marker = _crafted(tmp_path, "sae.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_sae(path)
    assert not marker.exists()


def test_a_truncated_model_file_names_the_file(tmp_path):
    path = save_model(build_model("gpt-tiny"), tmp_path / "model.pt")
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="unreadable, truncated") as error:
        load_model(path)
    assert str(path) in str(error.value)


def test_the_released_training_layout_loads_as_data(tmp_path):
    """nanoGPT's training script (which the paper's code uses) saves model, optimizer, model_args, iter_num,
    best_val_loss and its config globals: all plain data, so the safe loader reads it unchanged."""
    torch.manual_seed(0)
    original = build_model("crate-tiny").eval()
    optimizer = torch.optim.AdamW(original.parameters(), lr=1e-3)
    original(torch.randint(0, 100, (1, 8)), torch.randint(0, 100, (1, 8)))[1].backward()
    optimizer.step()
    state = {f"_orig_mod.{k.replace('.ln_1.', '.prenorm_1.').replace('.ln_2.', '.prenorm_2.')}": v
             for k, v in original.state_dict().items()}
    config = original.config
    torch.save({"model": state, "optimizer": optimizer.state_dict(),
                "model_args": {"n_layer": config.n_layer, "n_head": config.n_head, "n_embd": config.n_embd,
                               "block_size": config.block_size, "bias": False, "vocab_size": config.vocab_size,
                               "dropout": 0.0},
                "iter_num": 600000, "best_val_loss": torch.tensor(2.93),
                "config": {"batch_size": 12, "learning_rate": 6e-4, "dataset": "pile", "compile": True}},
               tmp_path / "ckpt.pt")
    loaded = load_model(tmp_path / "ckpt.pt").eval()
    idx = torch.randint(0, 50257, (1, 8))
    with torch.no_grad():
        assert torch.equal(original(idx)[0], loaded(idx)[0])


@pytest.mark.integration
def test_jobs_refuse_a_crafted_checkpoint_in_one_line(tmp_path):
    path, marker = _crafted(tmp_path, "model.pt")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for job, args in (("interpret.py", []), ("steer.py", ["--layer", "0", "--neuron", "0", "--value", "1"])):
        result = subprocess.run([sys.executable, str(REPO / "jobs" / job), "--checkpoint", str(path), *args],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode != 0, result.stdout
        assert "refused" in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert not marker.exists()
