"""The interface every explain/simulate backend implements, and the registry the config selects from."""

from __future__ import annotations

import importlib
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from crate.interp.records import Excerpt


class BackendError(RuntimeError):
    """A backend could not answer (after its retries); the feature is scored as failed with this reason."""


class CallCounter:
    """Model calls (HTTP attempts, forward passes) made by the current thread since `reset`."""

    def __init__(self):
        self._local = threading.local()

    def reset(self) -> None:
        self._local.count = 0

    def add(self, n: int = 1) -> None:
        self._local.count = getattr(self._local, "count", 0) + n

    @property
    def count(self) -> int:
        return getattr(self._local, "count", 0)


@dataclass
class Simulation:
    values: list[np.ndarray]  # per excerpt, one simulated activation (0..10 scale) per token
    n_defaulted: int = 0  # values that fell back to 0 (see RESULTS_SCHEMA)


class Explainer(ABC):
    model_name: str

    @abstractmethod
    def explain(self, excerpts: Sequence[Excerpt], seed: int) -> str:
        """A one-phrase explanation of the feature these records show (raises BackendError/MalformedOutput)."""


class Simulator(ABC):
    model_name: str
    kind: str  # crate.interp.schema.SIMULATOR_KINDS

    @abstractmethod
    def simulate(self, explanation: str, excerpts: Sequence[Excerpt]) -> Simulation:
        """The activations an explanation predicts for each excerpt's tokens (raises BackendError/MalformedOutput)."""


@dataclass
class Backend:
    name: str  # the results' `backend` key
    explainer: Explainer
    simulator: Simulator
    calls: CallCounter = field(default_factory=CallCounter)
    reading: str = "full"  # BackendConfig.reading (the token-set baseline reads no logprobs; rows record the field)
    prompt_format: str = "crate-v1"

    def close(self) -> None:
        for part in (self.explainer, self.simulator):
            close = getattr(part, "close", None)
            if close is not None:
                close()


# name -> "module:function" building a Backend from (BackendConfig, seed); imported on use, so the HF stack is
# only loaded where it runs.
BACKENDS = {
    "tokenset": "crate.interp.backends.tokenset:build",
    "http": "crate.interp.backends.http:build",
    "hf": "crate.interp.backends.hf:build",
}


def build_backend(config, seed: int = 0) -> Backend:
    """The backend `config` (BackendConfig) names; `auto` fields resolved by the default protocol where the
    config did not come through an InterpConfig (which resolves them by its own)."""
    config = config.resolved()
    module, _, function = BACKENDS[config.kind].partition(":")
    backend = getattr(importlib.import_module(module), function)(config, seed)
    backend.reading, backend.prompt_format = config.reading, config.prompt_format
    return backend


def backend_label(kind: str, explainer: str, simulator: str, sampled: bool = False) -> str:
    models = explainer if explainer == simulator else f"{explainer}|{simulator}"
    return f"{kind}:{models}" + (" (sampled)" if sampled else "")
