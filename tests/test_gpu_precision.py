"""The GPU recipes' precision, proved on the CPU: bf16 autocast compute, fp32 master weights, fp32 gradient
accumulation, an fp32 loss and an fp32 export, under DeepSpeed at every ZeRO stage and in the torch engine.

DeepSpeed's dtype handling is the same on the CPU backend as on CUDA, so each ZeRO stage trains here in one
process (a world of one over gloo) with the recipes' `precision: bf16`, a few optimizer steps of three
micro-batches each, and is compared with the torch engine on the same weights and batches.
"""

import logging
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from crate.config import load_config
from crate.errors import CheckpointError
from crate.model import build_model
from crate.model.checkpoint import read_checkpoint
from crate.train.checkpoint import MODEL_FILE, write_checkpoint
from crate.train.config import OptimConfig, PretrainConfig, TrainConfig
from crate.train.engine import DeepSpeedEngine, TorchEngine
from crate.train.metrics import peak_flops, table_peak_flops
from crate.train.runtime import single_process_env

GPU_RECIPES = ["pile", "crate-12l-1gpu"]
PRESET, CONTEXT, MICRO, ACCUM, STEPS = "crate-tiny", 32, 2, 3, 4
# The same bf16 autocast matmuls over the same fp32 weights: the engines differ only in how DeepSpeed orders the
# fp32 reductions (flattened ZeRO partitions, its own norm); pure bf16 training (DeepSpeed's `bf16` section)
# rounds the weights, the accumulated gradients and the loss to bf16 and fails these checks.
LOSS_RTOL = 1e-4


def recipe_precision() -> str:
    precisions = {load_config(PretrainConfig, name).train.precision for name in GPU_RECIPES}
    assert len(precisions) == 1, f"the GPU recipes disagree on precision: {precisions}"
    return precisions.pop()


def train_config(stage: int) -> TrainConfig:
    return TrainConfig(launcher="local", engine="deepspeed", zero_stage=stage, precision=recipe_precision(),
                       micro_batch_size=MICRO, global_batch_size=MICRO * ACCUM,
                       optim=OptimConfig(lr=1e-3, min_lr=0.0, warmup_steps=0))


def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(0, 50257, (MICRO, CONTEXT + 1), generator=generator) for _ in range(STEPS * ACCUM)]


def fp32_master(engine, param: torch.nn.Parameter) -> torch.Tensor:
    """The optimizer's fp32 copy of `param` (ZeRO keeps its own; without ZeRO the optimizer steps the param)."""
    from deepspeed.utils import safe_get_full_fp32_param

    master = safe_get_full_fp32_param(param) if isinstance(engine, DeepSpeedEngine) else None
    return (param if master is None else master).detach()


def accumulated_grad(engine, param: torch.nn.Parameter) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_grad

    return (safe_get_full_grad(param) if isinstance(engine, DeepSpeedEngine) else param.grad).detach().clone()


def train(engine_class, stage: int) -> dict:
    """A few optimizer steps; what the engine held along the way."""
    single_process_env()
    torch.manual_seed(0)
    model = build_model(PRESET, block_size=CONTEXT)
    expected_params = model.num_params()
    train_cfg = train_config(stage)
    engine = engine_class(model, train_cfg, torch.device("cpu"), train_cfg.precision)
    seen: dict = {"losses": [], "norms": [], "loss_dtypes": set(), "expected_params": expected_params,
                  "params": engine.num_params, "engine": engine}
    data = iter(batches())
    for step in range(STEPS):
        engine.set_lr(train_cfg.optim.lr)
        losses = []
        for micro in range(ACCUM):
            tokens = next(data)
            loss = engine.forward_backward(tokens[:, :-1], tokens[:, 1:])
            seen["loss_dtypes"].add(loss.dtype)
            losses.append(loss)
        if step == 0:  # the micro-batches' gradients accumulated, the optimizer step not yet taken
            seen["grads"] = {name: accumulated_grad(engine, p) for name, p in engine.module.named_parameters()}
        seen["norms"].append(engine.finish_step())
        seen["losses"].append(torch.stack(losses).float().mean().item())
    seen["param_dtypes"] = {p.ds_tensor.dtype if hasattr(p, "ds_tensor") else p.dtype
                            for p in engine.module.parameters()}
    seen["masters"] = {name: fp32_master(engine, p).clone() for name, p in engine.module.named_parameters()}
    return seen


_runs: dict = {}


@pytest.fixture(scope="module")
def run():
    def get(kind: str, stage: int = 0) -> dict:
        if ("torch", 0) not in _runs:  # first: the reference runs in a process DeepSpeed has not touched yet
            _runs["torch", 0] = train(TorchEngine, 0)
        if (kind, stage) not in _runs:
            _runs[kind, stage] = train(DeepSpeedEngine if kind == "deepspeed" else TorchEngine, stage)
        return _runs[kind, stage]

    yield get
    _runs.clear()


STAGES = [0, 1, 2, 3]


def test_gpu_recipes_train_in_bf16_autocast():
    assert recipe_precision() == "bf16"


@pytest.mark.integration
@pytest.mark.parametrize("stage", STAGES)
def test_every_zero_stage_keeps_fp32_master_weights_gradients_and_loss(run, stage):
    seen = run("deepspeed", stage)
    assert seen["param_dtypes"] == {torch.float32}
    assert {g.dtype for g in seen["grads"].values()} == {torch.float32}
    assert {m.dtype for m in seen["masters"].values()} == {torch.float32}
    assert seen["loss_dtypes"] == {torch.float32}
    assert all(math.isfinite(norm) and norm > 0 for norm in seen["norms"]), seen["norms"]


@pytest.mark.integration
@pytest.mark.parametrize("stage", STAGES)
def test_every_zero_stage_accumulates_the_torch_engines_gradients_and_follows_its_loss_curve(run, stage):
    deepspeed, torch_engine = run("deepspeed", stage), run("torch")
    for name, grad in torch_engine["grads"].items():  # summed in fp32: not rounded to bf16 along the way
        torch.testing.assert_close(deepspeed["grads"][name], grad, rtol=1e-4, atol=1e-7, msg=name)
    assert deepspeed["losses"] == pytest.approx(torch_engine["losses"], rel=LOSS_RTOL)
    assert deepspeed["norms"] == pytest.approx(torch_engine["norms"], rel=1e-3)


@pytest.mark.integration
@pytest.mark.parametrize("stage", STAGES)
def test_the_export_holds_the_fp32_master_weights_bit_for_bit(run, stage, tmp_path):
    seen = run("deepspeed", stage)
    engine = seen["engine"]
    state = {"step": STEPS, "tokens_seen": 0, "engine": "deepspeed", "zero_stage": stage}
    write_checkpoint(tmp_path, engine, 0, 1, state, {}, engine.module.config)
    exported = read_checkpoint(tmp_path / MODEL_FILE)["model"]
    for name, master in seen["masters"].items():
        assert exported[name].dtype == torch.float32
        assert torch.equal(exported[name], master), name


@pytest.mark.integration
@pytest.mark.parametrize("stage", STAGES)
def test_the_parameter_count_is_the_models_at_every_zero_stage(run, stage):
    seen = run("deepspeed", stage)
    assert seen["params"] == seen["expected_params"] > 0


def test_the_loss_is_fp32_even_for_a_bf16_model():
    torch.manual_seed(0)
    model = build_model(PRESET, block_size=CONTEXT).to(torch.bfloat16)
    tokens = batches()[0]
    logits, loss = model(tokens[:, :-1], tokens[:, 1:])
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert torch.equal(loss, F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()))


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 PCIe", 756), ("NVIDIA H100 NVL", 835),
    ("NVIDIA H200", 989), ("NVIDIA H200 NVL", 835), ("NVIDIA GH200 480GB", 989),
    ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100-PCIE-40GB", 312), ("NVIDIA A100 80GB PCIe", 312),
    ("NVIDIA A10G", 125), ("NVIDIA A10", 125), ("NVIDIA L40S", 362), ("NVIDIA L40", 181), ("NVIDIA L4", 121),
    ("Tesla T4", None), ("NVIDIA GeForce RTX 4090", None), ("NVIDIA H800", None),
])
def test_mfu_peak_is_the_devices_own_variant(name, tflops):
    peak = table_peak_flops(name)
    assert (peak / 1e12 if peak else None) == tflops


def test_the_mfu_peak_is_logged_with_the_device(caplog):
    with caplog.at_level(logging.INFO, logger="crate.train.metrics"):
        assert peak_flops(torch.device("cpu"), 5e12) == 5e12
    assert "5 TFLOP/s" in caplog.text and "cpu" in caplog.text and "train.peak_flops" in caplog.text


def test_the_torch_engine_state_loads_tensors_and_plain_values_only(tmp_path):
    torch.manual_seed(0)
    cfg = TrainConfig(launcher="local", engine="torch", micro_batch_size=MICRO, global_batch_size=MICRO)
    engine = TorchEngine(build_model(PRESET, block_size=CONTEXT), cfg, torch.device("cpu"), "fp32")
    engine.save(tmp_path, 0)
    engine.load(tmp_path)  # what the engine writes, it reads
    torch.save({"model": engine.module.state_dict(), "optimizer": Path("an arbitrary object")}, tmp_path / "engine.pt")
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "engine.pt"))):
        engine.load(tmp_path)
