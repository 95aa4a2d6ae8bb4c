"""`python -m crate.model`: the preset table with parameter counts computed from the architecture."""

from __future__ import annotations

import torch

from crate.model import PRESETS, build_model

# The paper's printed counts (its model table), for comparison; 6L CRATE's 55.9M is a typo for 59.9M.
PAPER = {"crate-1l": "6.54M", "crate-2l": "6.64M", "crate-3l": "6.74M", "crate-6l": "55.9M", "crate-12l": "81.2M",
         "gpt-1l": "6.64M", "gpt-2l": "6.83M", "gpt-3l": "7.03M", "gpt-6l": "81.1M", "gpt-12l": "123.6M"}


def main() -> None:
    print(f"{'preset':<11} {'layers':>6} {'d':>5} {'heads':>5} {'neurons/layer':>13} {'params':>13} {'paper':>7} "
          f"{'GFLOP/token':>11}")
    for name in PRESETS:
        with torch.device("meta"):  # shapes only: no memory, no init time
            model = build_model(name)
        c = model.config
        print(f"{name:<11} {c.n_layer:>6} {c.n_embd:>5} {c.n_head:>5} {c.n_neurons:>13} {model.num_params():>13,} "
              f"{PAPER.get(name, ''):>7} {model.flops_per_token() / 1e9:>11.3f}")
    print("\nparams: nanoGPT's count (tied embedding once, position embedding excluded); "
          "GFLOP/token: training (fwd+bwd) matmul FLOPs at the preset's context (1024; tiny: 64).")


if __name__ == "__main__":
    main()
