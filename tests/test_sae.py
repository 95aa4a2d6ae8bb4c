"""SAE baselines: dictionary recovery, dead-feature resampling, the spliced-in loss evaluation, checkpoints."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from crate.errors import ConfigError
from crate.model import build_model, save_model
from crate.sae import (SAEConfig, SAESource, SAETrainConfig, SAETrainer, SparseAutoencoder, evaluate_sae,
                       load_sae, save_sae, shuffled_batches, train_sae)

_spec = importlib.util.spec_from_file_location("train_sae_job", Path(__file__).parents[1] / "jobs" / "train_sae.py")
train_sae_job = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_sae_job)


def sparse_dictionary(n_atoms=64, d=32, k=3, batch=256, seed=0):
    """x = Σ of k random unit atoms with magnitudes in [0.5, 1.5]: the ground truth an SAE should find."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d, generator=g)
    atoms /= atoms.norm(dim=-1, keepdim=True)

    def batches():
        while True:
            chosen = torch.rand(batch, n_atoms, generator=g).argsort(-1)[:, :k]
            codes = torch.zeros(batch, n_atoms).scatter_(1, chosen, 0.5 + torch.rand(batch, k, generator=g))
            yield codes @ atoms

    return atoms, batches()


@pytest.mark.integration  # 40 s of training: too long for the inner loop
def test_training_recovers_the_atoms_of_a_sparse_dictionary():
    atoms, batches = sparse_dictionary()
    config = SAETrainConfig(expansion=2, l1_coefficient=0.3, lr=1e-2, batch_size=256, steps=1000,
                            resample_at=[250, 500], dead_window=125, resample_inputs=2048, buffer_size=1024,
                            log_every=100)
    trainer = SAETrainer(config, d_in=32)
    logged = []
    history = train_sae(trainer, batches, log_metrics=lambda m, step: logged.append(step), progress=False)
    assert logged == [h["step"] for h in history] == list(range(100, 1001, 100))
    assert history[-1]["train/fvu"] < 0.2 < history[0]["train/fvu"]
    assert history[-1]["train/l0"] < 8  # ground truth: 3 atoms per input
    best_cosine = (atoms @ trainer.sae.W_dec.detach().T).max(-1).values
    assert (best_cosine > 0.9).float().mean() >= 0.9
    assert torch.allclose(trainer.sae.W_dec.norm(dim=-1), torch.ones(64), atol=1e-5)


def test_dead_features_are_resampled_from_badly_reconstructed_inputs():
    _, batches = sparse_dictionary(batch=128)
    config = SAETrainConfig(expansion=2, l1_coefficient=0.3, lr=1e-2, batch_size=128, steps=30, dead_window=10,
                            resample_inputs=512, buffer_size=256, resample_at=[20])
    trainer = SAETrainer(config, d_in=32)
    sae = trainer.sae
    dead = torch.arange(8)
    with torch.no_grad():
        sae.b_enc[dead] = -1e4  # these can never fire
    for _ in range(20):
        trainer.train_step(next(batches))
    assert trainer.dead_features()[dead].all() and trainer.dead_features().sum() == len(dead)
    alive_norm = sae.W_enc[8:].norm(dim=-1).mean().item()
    assert trainer.resample_dead(torch.cat([next(batches) for _ in range(4)])) == len(dead)
    assert torch.allclose(sae.W_dec[dead].norm(dim=-1), torch.ones(8), atol=1e-5)
    assert torch.allclose(sae.W_enc[dead].norm(dim=-1), torch.full((8,), 0.2 * alive_norm), rtol=1e-4)
    assert (sae.b_enc[dead] == 0).all() and (trainer.steps_since_fired[dead] == 0).all()
    for param in (sae.W_enc, sae.W_dec, sae.b_enc):
        state = trainer.optimizer.state[param]
        assert (state["exp_avg"][dead] == 0).all() and (state["exp_avg_sq"][dead] == 0).all()
    # the new atoms point at real inputs: they fire again
    fired = (sae.encode(torch.cat([next(batches) for _ in range(4)]))[:, dead] > 0).any(0)
    assert fired.float().mean() >= 0.5


def identity_sae(d: int) -> SparseAutoencoder:
    """f = ReLU(x), x̂ = f: exact on non-negative inputs (post-ReLU neurons)."""
    sae = SparseAutoencoder(SAEConfig(d_in=d, expansion=1))
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d))
        sae.W_dec.copy_(torch.eye(d))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


@pytest.mark.parametrize("arch", ["gpt", "crate"])
def test_loss_recovered_is_one_for_an_exact_sae_and_zero_for_an_empty_one(arch):
    torch.manual_seed(0)
    model = build_model(f"{arch}-tiny")
    blocks = torch.tensor(np.random.default_rng(0).integers(0, 50257, (6, 17)))
    d = model.config.n_neurons
    exact = evaluate_sae(model, 0, identity_sae(d), blocks.split(4))
    assert exact.loss_spliced == pytest.approx(exact.loss_clean, abs=1e-5)
    assert exact.loss_recovered == pytest.approx(1.0, abs=1e-4)
    assert exact.fvu == pytest.approx(0.0, abs=1e-9) and exact.tokens == 6 * 16
    empty = identity_sae(d)
    with torch.no_grad():
        empty.W_dec.zero_()
    nothing = evaluate_sae(model, 0, empty, blocks.split(4))
    assert nothing.loss_spliced == pytest.approx(nothing.loss_zero_ablated, abs=1e-5)
    assert nothing.loss_recovered == pytest.approx(0.0, abs=1e-4)
    assert nothing.fvu == pytest.approx(1.0 + exact_mean_share(model, blocks), rel=1e-4)


def exact_mean_share(model, blocks) -> float:
    """‖x‖² / ‖x − x̄‖² − 1: what a zero reconstruction's FVU exceeds 1 by (it also misses the mean)."""
    with torch.no_grad(), model.capture_neurons([0]) as captured:
        model(blocks[:, :-1])
    x = captured[0].flatten(0, 1).double()
    return float(x.pow(2).sum() / (x - x.mean(0)).pow(2).sum() - 1)


def counting_sequences(rng, n):
    """Runs of consecutive token ids (mod 50, in one of three ranges): a tiny model learns them in 100 steps."""
    return (rng.integers(0, 50, (n, 1)) + np.arange(17)) % 50 + 100 * rng.integers(0, 3, (n, 1))


def test_a_trained_sae_recovers_most_of_the_loss_of_a_trained_tiny_model():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_model("gpt-tiny", vocab_size=256)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        batch = torch.tensor(counting_sequences(rng, 32))
        loss = model(batch[:, :-1], batch[:, 1:])[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.requires_grad_(False)
    tokens = counting_sequences(rng, 48)
    with torch.no_grad(), model.capture_neurons([1]) as captured:
        model(torch.tensor(tokens[:32, :-1]))
    config = SAETrainConfig(expansion=4, l1_coefficient=1e-2, lr=3e-3, batch_size=128, steps=300,
                            buffer_size=256, resample_at=[])
    trainer = SAETrainer(config, d_in=model.config.n_neurons)
    rows = captured[1].flatten(0, 1)
    train_sae(trainer, shuffled_batches(iter([rows] * 300), 1024, 128, torch.Generator().manual_seed(0)),
              progress=False)
    result = evaluate_sae(model, 1, trainer.sae, torch.tensor(tokens[32:]).split(4))
    assert result.loss_zero_ablated > result.loss_clean + 0.1  # the layer matters
    assert 0.8 < result.loss_recovered <= 1.0
    assert result.fvu < 0.2 and 0 < result.l0 < trainer.sae.config.n_features / 2
    assert result.feature_density.shape == (trainer.sae.config.n_features,)


def test_checkpoint_round_trip_keeps_weights_source_and_metrics(tmp_path):
    sae = SparseAutoencoder(SAEConfig(d_in=8, expansion=4, l1_coefficient=1e-3))
    source = SAESource(checkpoint="/models/gpt.pt", arch="gpt", layer=1, model_run_id="abc")
    path = save_sae(sae, tmp_path / "sae.pt", source, metrics={"eval/fvu": 0.1})
    loaded, loaded_source = load_sae(path)
    assert loaded_source == source and loaded.config == sae.config
    assert loaded.checkpoint_metrics == {"eval/fvu": 0.1}
    assert all(torch.equal(a, b) for a, b in zip(sae.state_dict().values(), loaded.state_dict().values()))
    torch.save({"model": {}}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="not an SAE checkpoint"):
        load_sae(tmp_path / "model.pt")


def test_the_shuffle_buffer_yields_every_row_once_and_mixes_chunks():
    chunks = [torch.arange(i * 100, (i + 1) * 100).float()[:, None] for i in range(10)]
    batches = list(shuffled_batches(iter(chunks), buffer_size=300, batch_size=50,
                                    generator=torch.Generator().manual_seed(0)))
    rows = torch.cat(batches).flatten()
    assert sorted(rows.tolist()) == list(range(1000))
    assert len({int(v) // 100 for v in batches[0].flatten()}) >= 3  # the first batch mixes three chunks


def write_corpus(path, n_docs, seed):
    rng = np.random.default_rng(seed)
    words = "the a neuron layer sparse code model token fires on digits and brackets while other units stay".split()
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 40))}) + "\n" for _ in range(n_docs)))
    return str(path)


def test_the_job_trains_evaluates_saves_tracks_and_resumes(tmp_path):
    checkpoint = save_model(build_model("gpt-tiny"), tmp_path / "gpt.pt", mlflow_run_id="pretrain-run")
    train, val = write_corpus(tmp_path / "train.jsonl", 200, 0), write_corpus(tmp_path / "val.jsonl", 20, 1)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    argv = ["--checkpoint", str(checkpoint), "--layer", "1", "--output-dir", str(tmp_path / "sae"),
            f"data.train={train}", f"data.val={val}", "data.context=16", "eval_blocks=4", "sae.expansion=2",
            "sae.batch_size=64", "sae.buffer_size=256", "sae.log_every=5", "sae.checkpoint_every=10",
            "sae.resample_at=[10]", "sae.dead_window=5", "sae.resample_inputs=128", f"tracking.uri={uri}",
            "tracking.system_metrics=false"]
    train_sae_job.main([*argv, "--steps", "20"])
    state = torch.load(tmp_path / "sae" / "train_state.pt", weights_only=True)
    assert state["trainer"]["step"] == 20 and state["data"] is not None
    train_sae_job.main([*argv, "--steps", "30"])  # continues at step 20 in the same MLflow run
    sae, source = load_sae(tmp_path / "sae" / "sae.pt")
    assert (source.arch, source.layer, source.model_run_id) == ("gpt", 1, "pretrain-run")
    assert sae.config.n_features == 2 * 128
    metrics = json.loads((tmp_path / "sae" / "metrics.json").read_text())
    assert metrics["step"] == 30 and metrics["eval/tokens"] == 4 * 16
    assert set(sae.checkpoint_metrics) == {k for k in metrics if k != "step"}

    import mlflow

    client = mlflow.tracking.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("crate-lm").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["crate.model_run_id"] == "pretrain-run"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/fvu")]
    assert steps == [5, 10, 15, 20, 25, 30]
    assert {"eval/loss_recovered", "eval/fvu", "eval/l0", "eval/dead_fraction"} <= set(run.data.metrics)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"metrics.json", "feature_density.png"}


def test_the_job_rejects_a_layer_the_model_does_not_have(tmp_path):
    checkpoint = save_model(build_model("gpt-tiny"), tmp_path / "gpt.pt")
    with pytest.raises(ConfigError, match="2 layers"):
        train_sae_job.main(["--checkpoint", str(checkpoint), "--layer", "2", "tracking.enabled=false"])
