"""The GPU-only checks, for a host with one CUDA GPU and torch alone (no Ray, DeepSpeed or MLflow needed).

    pip install numpy pyyaml tiktoken pyarrow tqdm        # what crate's model, trainer and collector import
    python platform/gpu-check.py                          # on the GPU host, from the repository root (< 8 min)
    python platform/gpu-check.py --dry-run                # the same checks on the CPU, tiny (tests run this)

One JSON line per check ({"check", "ok", "seconds", ...}, or "skipped" with the reason); the exit status is 1
when any check failed. The checks:
- environment: torch, the device and its name, bf16 support, and the MFU peak the table gives that name;
- fwd_bwd/<arch>/<eager|compile>: forward/backward of CRATE and GPT under bf16 autocast, eager and
  `torch.compile`d: fp32 weights and gradients, bf16 logits, an fp32 finite loss, compiled = eager loss;
- torch_engine: the training engine's mixed precision on the device (fp32 gradients accumulated over
  micro-batches, finite grad norm, fp32 export equal to the weights, the engine on the requested device);
- benchmark/core: `jobs/benchmark.py` core steps of CRATE-12L and GPT-12L (the 1-GPU recipe's settings);
- benchmark/platform: the same with DeepSpeed, skipped with the reason when DeepSpeed cannot be imported;
- records: the collector's records on the device equal the CPU's (float32 with TF32 matmuls: the same units
  but for reordered near-ties, activations within TF32's error);
- benchmark_records: `jobs/benchmark_records.py` (CRATE-12L, the paper's 8000 x 1024 tokens).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import runpy
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from crate.model import build_model  # noqa: E402
from crate.train.config import TrainConfig  # noqa: E402
from crate.train.engine import TorchEngine  # noqa: E402
from crate.train.metrics import table_peak_flops  # noqa: E402

failures: list[str] = []


def report(check: str, body) -> None:
    """Run one check (a function returning its details) and print its JSON line."""
    start = time.perf_counter()
    try:
        details = body() or {}
        line = {"check": check, "ok": True, **details}  # a skipped check says why, and is no failure
    except Exception as error:  # a check that fails is reported, and the others still run
        failures.append(check)
        line = {"check": check, "ok": False, "error": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc(limit=4)}
    line["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(line), flush=True)


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def environment(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = table_peak_flops(name) if device.type == "cuda" else None
    return {"torch": torch.__version__, "python": sys.version.split()[0], "device": str(device), "name": name,
            "bf16": torch.cuda.is_bf16_supported() if device.type == "cuda" else True,
            "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
            "peak_tflops": peak / 1e12 if peak else None}


def fwd_bwd(preset: str, compiled: bool, device: torch.device, context: int, batch: int, backend: str) -> dict:
    torch.manual_seed(0)
    model = build_model(preset, block_size=context).to(device)
    tokens = torch.randint(0, 50257, (batch, context + 1), device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logits, eager_loss = model(tokens[:, :-1], tokens[:, 1:])
    forward = torch.compile(model, backend=backend) if compiled else model
    with torch.autocast(device.type, dtype=torch.bfloat16):
        logits, loss = forward(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    grads = {p.grad.dtype for p in model.parameters()}
    expect({p.dtype for p in model.parameters()} == {torch.float32}, "weights are not fp32")
    expect(logits.dtype == torch.bfloat16, f"logits are {logits.dtype}, not bf16 under autocast")
    expect(loss.dtype == torch.float32 and math.isfinite(loss.item()), f"loss {loss.item()} ({loss.dtype})")
    expect(grads == {torch.float32}, f"gradients are {grads}")
    expect(all(torch.isfinite(p.grad).all() for p in model.parameters()), "non-finite gradients")
    if compiled:  # same numerics: compiled kernels fuse, they do not change the precision
        expect(abs(loss.item() - eager_loss.item()) <= 2e-2 * abs(eager_loss.item()),
               f"compiled loss {loss.item()} vs eager {eager_loss.item()}")
    return {"preset": preset, "loss": round(loss.item(), 4), "eager_loss": round(eager_loss.item(), 4),
            "logits": str(logits.dtype), "backend": backend if compiled else None}


def torch_engine(preset: str, device: torch.device, context: int, micro: int) -> dict:
    torch.manual_seed(0)
    train = TrainConfig(launcher="local", engine="torch", precision="bf16", micro_batch_size=micro,
                        global_batch_size=2 * micro)
    engine = TorchEngine(build_model(preset, block_size=context), train, device, "bf16")
    expect(next(engine.module.parameters()).device.type == engine.device.type == device.type,
           f"model on {next(engine.module.parameters()).device}, engine on {engine.device}, asked for {device}")
    norms = []
    for _ in range(2):
        engine.set_lr(1e-4)
        for _ in range(train.grad_accum_steps):
            tokens = torch.randint(0, 50257, (micro, context + 1), device=engine.device)
            loss = engine.forward_backward(tokens[:, :-1], tokens[:, 1:])
            expect(loss.dtype == torch.float32, f"loss is {loss.dtype}")
        grads = {p.grad.dtype for p in engine.module.parameters()}
        expect(grads == {torch.float32}, f"accumulated gradients are {grads}")
        norms.append(engine.finish_step())
    expect(all(math.isfinite(n) for n in norms), f"grad norms {norms}")
    exported = engine.full_state_dict()
    expect(all(v.dtype == torch.float32 for v in exported.values()), "the export is not fp32")
    expect(all(torch.equal(exported[n], p) for n, p in engine.module.named_parameters()), "export != weights")
    return {"preset": preset, "grad_norms": [round(n, 4) for n in norms], "params": engine.num_params}


def job(script: str, argv: list[str]) -> list[str]:
    """A job script's main(argv) in this process (so a torch-only host needs nothing more); its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        runpy.run_path(str(REPO / "jobs" / script), run_name="device_check")["main"](argv)
    return out.getvalue().splitlines()


def benchmark(step: str, presets: list[str], device: torch.device, tiny: bool) -> dict:
    if step == "platform":
        try:
            import deepspeed  # noqa: F401
        except ImportError as error:
            return {"skipped": f"the platform step needs DeepSpeed, which is not importable here ({error})"}
    argv = [f"presets=[{','.join(presets)}]", f"steps={step}"]
    argv += (["recipe=crate-12l-1gpu", "micro_batch_size=16"] if not tiny else
             ["recipe=smoke", "micro_batch_size=2", "context=32", "warmup=1", "iters=2", "compile=false"])
    lines = [json.loads(line) for line in job("benchmark.py", argv)]
    expect([line["preset"] for line in lines] == presets, f"benchmark measured {[l['preset'] for l in lines]}")
    for line in lines:
        expect(line["tokens_per_s"] > 0, f"{line['preset']}: {line['tokens_per_s']} tokens/s")
        expect(device.type != "cuda" or line["precision"] == "bf16", f"{line['preset']}: {line['precision']}")
    return {"results": lines}


def benchmark_records(device: torch.device, tiny: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "benchmark_records.json"
        argv = [f"output={output}", f"device={device.type}"]
        if tiny:
            argv += ["preset=crate-tiny", "records.blocks=8", "records.block_length=64", "records.window=16",
                     "records.batch_blocks=4"]
        job("benchmark_records.py", argv)
        result = json.loads(output.read_text())
    expect(result.get("total_s", 0) > 0, f"no total time in {sorted(result)}")
    return {"result": result}


def records_match_the_cpus(device: torch.device) -> dict:
    import numpy as np

    from crate.interp.collect import batched, collect
    from crate.interp.config import CollectionConfig
    from crate.interp.features import ModelNeurons

    torch.manual_seed(0)
    model = build_model("crate-tiny")
    blocks = list(np.random.default_rng(0).integers(0, 50257, (16, 64)))
    spec = CollectionConfig(blocks=16, block_length=64, window=16, windows="centered", top=10, random=10,
                            per_quantile=2, quantile_pool=20, batch_blocks=4)
    features = {0: np.arange(model.config.n_neurons), 1: np.arange(model.config.n_neurons)}
    runs = [collect(model, batched(blocks, 4), spec, ModelNeurons(), features, 0, d) for d in ("cpu", device.type)]
    agreement = {}
    for layer in features:
        cpu, other = ({k: v[r["kind"] != "quantile"] for k, v in r.items() if k != "layer"}  # bins: by value
                      for r in (run.records(layer) for run in runs))
        expect(other["activations"].dtype == np.float32, f"records are {other['activations'].dtype}")
        expect(len(cpu["block"]) == len(other["block"]), "record counts differ")
        same = (cpu["block"] == other["block"]) & (cpu["start"] == other["start"])
        expect(same.mean() > 0.95, f"layer {layer}: {same.mean():.3f} of the records are the CPU's")
        np.testing.assert_allclose(cpu["activations"][same], other["activations"][same], rtol=1e-2, atol=1e-3)
        agreement[layer] = round(float(same.mean()), 4)
    return {"same_records": agreement}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same checks on the CPU, on tiny models")
    args = parser.parse_args(argv)
    tiny = args.dry_run
    device = torch.device("cpu") if tiny else torch.device("cuda", 0)
    if not tiny and not torch.cuda.is_available():
        print(json.dumps({"check": "environment", "ok": False, "error": "no CUDA device (--dry-run runs on the CPU)"}))
        return 1
    # Dry run: dynamo traces and the eager backend runs the graph (inductor would compile for minutes on a CPU).
    backend = "eager" if tiny else "inductor"
    context, batch = (32, 2) if tiny else (1024, 8)
    presets = ["crate-tiny", "gpt-tiny"] if tiny else ["crate-12l", "gpt-12l"]
    small = ["crate-tiny", "gpt-tiny"] if tiny else ["crate-2l", "gpt-2l"]  # compile time grows with depth
    start = time.perf_counter()
    report("environment", lambda: environment(device))
    for preset in small:
        for compiled in (False, True):
            report(f"fwd_bwd/{preset.split('-')[0]}/{'compile' if compiled else 'eager'}",
                   lambda: fwd_bwd(preset, compiled, device, context, batch, backend))
    report("torch_engine", lambda: torch_engine(small[0], device, context, batch))
    report("benchmark/core", lambda: benchmark("core", presets, device, tiny))
    report("benchmark/platform", lambda: benchmark("platform", presets, device, tiny))
    report("records", lambda: records_match_the_cpus(device))
    report("benchmark_records", lambda: benchmark_records(device, tiny))
    print(json.dumps({"check": "summary", "ok": not failures, "failed": failures,
                      "seconds": round(time.perf_counter() - start, 1)}), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
