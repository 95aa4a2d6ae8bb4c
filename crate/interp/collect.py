"""Activation-record collection: one pass over the evaluation stream keeps, per feature, the top units, a uniform
random sample and samples from activation-quantile bins, each with its window of per-token activations.

Runs with torch alone on one device; every selection is a whole-tensor operation over all features of a layer
(no per-feature Python loops). A collector state merges associatively with another built on a disjoint part of
the stream, so Ray actors can shard the blocks and merge (crate.interp.distributed); the merged result is
identical to one pass over the whole stream, whatever the sharding or batch size.

Units and windows (`CollectionConfig.windows`):
- "stream" (the paper's `activations_crate_overcomplete.py`): a unit is a token; its record is the `window` tokens
  [t - window/2, t + window/2) of the flattened token stream, so it runs into the neighbouring block at a block
  edge and is truncated at the stream's start and end (the missing positions are stored as token -1, activation
  NaN, and dropped when records are read). Each batch of consecutive blocks comes with the activations of the
  blocks just before and after it (`with_neighbours`), which only fill windows.
- "centered": a unit is a token. A record is the `window` tokens around it, [t - window/2, t + window/2), shifted
  to stay inside the token's block (every record comes from one forward context; `focus` says where the unit
  sits). Top windows of neighbouring tokens may overlap, as in the paper's code, where the top 50 token positions
  are taken independently.
- "fragments" (OpenAI's excerpts): a block is cut into aligned windows, a unit is a window and its activation is
  the window's max. Records never overlap.

Selection, per feature (one total order each, so every selection is exact and shard-independent):
- top: the `top` units with the highest activation; ties go to the earlier unit in the stream. Keys pack the
  activation's order-preserving bits and the unit id into one int64. Per batch, only the `top` segments of
  SEGMENT units with the highest segment max can hold a top unit, so the exact top-k runs on a `top`·SEGMENT slice.
- random: the `random` units with the smallest sampling key k_n(g) = (h(g) + o_n) mod 2⁶² — h a bijective hash of
  the unit id g, o_n a per-feature offset spaced by the golden ratio. For each feature this is a uniform sample
  without replacement (h(g) is uniform; the offset only rotates it); the features of a layer draw disjoint units
  once the stream holds more than 2·(random + quantile_pool)·features units (offsets stay ≥ 0.52/features apart). Smallest keys form a contiguous arc of the sorted h(g), so a
  batch needs one sort of its unit hashes and a slice per feature, never a key per (unit, feature).
- quantile bins: the sampling pool is the next `quantile_pool` units of the same order. At the end the pool's
  activations estimate the feature's quantiles; bin b holds the pool units whose activation rank (ties broken by
  sampling key) among the pool's units that are not random records falls in [e_b, e_b+1); the first
  `per_quantile` of them in sampling order are the bin's records — a uniform sample of the bin. A bin narrower than per_quantile/quantile_pool of the distribution
  gets fewer records (the table says how many; raise quantile_pool for rare bins).
Windows are gathered only for units that enter a selection, while their batch is on the device.

Precision: records are collected in float32 on every device — no autocast, activations, selections and windows in
float32 — with TF32 matmuls on CUDA (10-bit mantissa inputs, float32 accumulation: ~1e-3 relative, against bf16's
~4e-3 and bf16 storage before). The precision is named in the collection id and the records' provenance
(`records_precision`: "float32" on a CPU, "float32+tf32" on CUDA), so GPU and CPU records never share an id.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from crate.interp.config import CollectionConfig

EMPTY = torch.iinfo(torch.int64).min  # key of an empty slot; every real key is larger
MASK62 = (1 << 62) - 1
SEGMENT = 16  # units per segment in the two-stage top-k
_GOLDEN = 2850178704830799621  # 2⁶²·(φ−1) rounded to odd: feature offsets stay ≥ 0.52/features apart on the circle
_MIX = (0x3C79AC492BA7B653, 0x1C69B3F74AC4AE35)  # odd multipliers of the bijective unit hash


def ordered_bits(values: torch.Tensor) -> torch.Tensor:
    """float -> int64 preserving order (IEEE-754 sign-magnitude flipped to two's complement); NaN sorts lowest."""
    v = torch.nan_to_num(values.float(), nan=float("-inf"))
    bits = v.view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def value_keys(values: torch.Tensor, units: torch.Tensor) -> torch.Tensor:
    """Higher activation first, then the earlier unit: one int64 per (unit, feature), larger is better."""
    return (ordered_bits(values) << 32) | (0xFFFFFFFF - units)


def unit_hash(units: np.ndarray, seed: int) -> np.ndarray:
    """A bijection of [0, 2⁶²) (add, xor-shift and odd multiply mod 2⁶²), seeded; uint64 arithmetic wraps."""
    m = np.uint64(MASK62)
    x = (units.astype(np.uint64) + np.uint64((seed * _GOLDEN) & MASK62)) & m
    x ^= x >> np.uint64(31)
    x = (x * np.uint64(_MIX[0])) & m
    x ^= x >> np.uint64(29)
    x = (x * np.uint64(_MIX[1])) & m
    x ^= x >> np.uint64(32)
    return x.astype(np.int64)


def feature_offsets(features: np.ndarray, layer: int, seed: int) -> np.ndarray:
    salt = np.uint64(unit_hash(np.array([layer]), seed + 1)[0])
    return ((features.astype(np.uint64) + np.uint64(1)) * np.uint64(_GOLDEN) + salt).astype(np.uint64) & np.uint64(MASK62)


class StageTimer:
    """Exclusive wall time per named stage (a nested stage pauses its parent); syncs CUDA when `sync`."""

    def __init__(self, sync: bool = False):
        self.sync = sync
        self.seconds: dict[str, float] = {}
        self._stack: list[tuple[str, float]] = []

    def _now(self) -> float:
        if self.sync and torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        now = self._now()
        if self._stack:
            parent, started = self._stack[-1]
            self.seconds[parent] = self.seconds.get(parent, 0.0) + now - started
        self._stack.append((stage, now))
        try:
            yield
        finally:
            now = self._now()
            _, started = self._stack.pop()
            self.seconds[stage] = self.seconds.get(stage, 0.0) + now - started
            if self._stack:
                self._stack[-1] = (self._stack[-1][0], now)


NO_TIMER = StageTimer()


@dataclass
class SlotSet:
    """The `capacity` best units per feature under int64 keys (larger is better), in unordered slots.

    keys/units/values: (S, N); windows: (S, N, window). Entering units replace evicted ones slot for slot, so only
    entrants' windows are ever gathered.
    """

    keys: torch.Tensor
    units: torch.Tensor
    values: torch.Tensor
    windows: torch.Tensor

    @classmethod
    def empty(cls, capacity: int, n: int, window: int, device: torch.device, window_dtype: torch.dtype) -> "SlotSet":
        return cls(torch.full((capacity, n), EMPTY, dtype=torch.int64, device=device),
                   torch.full((capacity, n), -1, dtype=torch.int64, device=device),
                   torch.zeros(capacity, n, device=device), torch.zeros(capacity, n, window, device=device, dtype=window_dtype))

    @property
    def capacity(self) -> int:
        return self.keys.shape[0]

    def worst(self) -> torch.Tensor:
        """(N,) the key a candidate must beat to enter (EMPTY while a slot is free)."""
        return self.keys.min(dim=0).values

    def offer(self, keys: torch.Tensor, units: torch.Tensor, values: torch.Tensor, sources: torch.Tensor,
              windows_of: Callable[[torch.Tensor], torch.Tensor], timer: StageTimer = NO_TIMER) -> None:
        """Keep the best `capacity` of slots ∪ candidates. Candidates: (C, N) keys/units/values and `sources`,
        which `windows_of` turns into (E, N, window) windows for the E entrants."""
        if self.capacity == 0 or keys.shape[0] == 0:
            return
        threshold = torch.kthvalue(torch.cat([self.keys, keys]), keys.shape[0] + 1, dim=0).values  # S-th best
        entering = (keys >= threshold) & (keys != EMPTY)
        evicted = (self.keys < threshold) | (self.keys == EMPTY)
        n_entering = entering.sum(dim=0)
        e = int(n_entering.max())
        if e == 0:
            return
        pick = torch.sort(entering.to(torch.int8), dim=0, descending=True, stable=True).indices[:e]  # (E, N)
        slot = torch.sort(evicted.to(torch.int8), dim=0, descending=True, stable=True).indices[:e]
        valid = torch.arange(e, device=keys.device)[:, None] < n_entering[None, :]
        with timer("windows"):
            windows = windows_of(sources.gather(0, pick))
        for stored, new in ((self.keys, keys.gather(0, pick)), (self.units, units.gather(0, pick)),
                            (self.values, values.gather(0, pick).float()), (self.windows, windows)):
            index = slot if stored.dim() == 2 else slot[..., None].expand(-1, -1, stored.shape[2])
            mask = valid if stored.dim() == 2 else valid[..., None]
            stored.scatter_(0, index, torch.where(mask, new.to(stored.dtype), stored.gather(0, index)))

    def merge(self, other: "SlotSet") -> None:
        rows = torch.arange(other.capacity, device=other.keys.device)[:, None].expand_as(other.keys)
        windows_of = lambda pick: other.windows.gather(0, pick[..., None].expand(-1, -1, other.windows.shape[2]))
        self.offer(other.keys, other.units, other.values, rows, windows_of)

    def ranked(self) -> tuple[np.ndarray, np.ndarray]:
        """(order, valid): slot indices best first, and which of them hold a unit; both (S, N) numpy."""
        order = torch.argsort(self.keys, dim=0, descending=True)
        return order.cpu().numpy(), (self.keys.gather(0, order) != EMPTY).cpu().numpy()

    def to(self, device: torch.device | str) -> "SlotSet":
        return SlotSet(*(t.to(device) for t in (self.keys, self.units, self.values, self.windows)))


@dataclass
class Geometry:
    """Where units and windows sit in a block."""

    block_length: int
    window: int
    mode: str

    @property
    def units_per_block(self) -> int:
        return self.block_length // self.window if self.mode == "fragments" else self.block_length

    def window_start(self, unit_in_block):
        """First token of a unit's window within its block (tensor or numpy); for stream windows it may lie in the
        block before (negative) and the window may end in the block after."""
        if self.mode == "stream":
            return unit_in_block - self.window // 2
        if self.mode == "centered":
            return (unit_in_block - self.window // 2).clip(0, self.block_length - self.window)
        return unit_in_block * self.window


class LayerCollector:
    """Selections and activation statistics of one layer's features (a subset `features` of them, or all)."""

    def __init__(self, layer: int, features: np.ndarray, spec: CollectionConfig, seed: int, device: torch.device):
        if spec.windows not in ("stream", "centered", "fragments"):
            raise ValueError(f"windows={spec.windows!r}: resolve it with CollectionConfig.resolved(protocol) first")
        self.layer, self.features, self.spec, self.seed = layer, np.asarray(features, dtype=np.int64), spec, seed
        self.geometry = Geometry(spec.block_length, spec.window, spec.windows)
        n, w = len(self.features), spec.window
        self.top = SlotSet.empty(spec.top, n, w, device, torch.float32)
        self.pool = SlotSet.empty(spec.random + (spec.quantile_pool if spec.n_bins else 0), n, w, device, torch.float32)
        offsets = feature_offsets(self.features, layer, seed)
        self.arc_start = torch.from_numpy(((np.uint64(1 << 62) - offsets) & np.uint64(MASK62)).astype(np.int64)).to(device)
        self.offsets = torch.from_numpy(offsets.astype(np.int64)).to(device)
        self.count = 0
        self.sum = torch.zeros(n, dtype=torch.float64, device=device)
        self.sum_sq = torch.zeros(n, dtype=torch.float64, device=device)
        self.positive = torch.zeros(n, dtype=torch.int64, device=device)
        self.max = torch.full((n,), float("-inf"), device=device)

    # -- one batch -------------------------------------------------------------------------------------------
    def update(self, acts: torch.Tensor, block_ids: np.ndarray, timer: StageTimer = NO_TIMER,
               neighbours: tuple[torch.Tensor | None, torch.Tensor | None] | None = None) -> None:
        """acts (B, T, N) of the blocks `block_ids` (B,), in any order; blocks must not repeat across updates.
        Stream windows: the blocks are consecutive and `neighbours` holds the (T, N) activations of the block
        before and the block after them (None where the stream ends)."""
        B, T, N = acts.shape
        if T != self.geometry.block_length or N != len(self.features):
            raise ValueError(f"layer {self.layer}: activations {tuple(acts.shape)} do not match block_length "
                             f"{self.geometry.block_length} and {len(self.features)} features")
        flat = acts.reshape(B * T, N)
        with timer("stats"):
            self._update_stats(flat)
        per_block = self.geometry.units_per_block
        unit_acts = acts.reshape(B, per_block, -1, N).amax(2).reshape(-1, N) if self.spec.windows == "fragments" else flat
        units_np = (np.asarray(block_ids, dtype=np.int64)[:, None] * per_block + np.arange(per_block)).reshape(-1)
        units = torch.from_numpy(units_np).to(acts.device)
        if self.spec.windows == "stream":
            source, shift = self._with_context(flat, block_ids, neighbours), self.geometry.window // 2
        else:
            source, shift = flat, 0
        windows_of = lambda local: self._batch_windows(source, local, T, shift)
        with timer("top"):
            self._offer_top(unit_acts, units, windows_of, timer)
        with timer("sample"):
            self._offer_sample(unit_acts, units_np, units, windows_of, timer)

    def _update_stats(self, flat: torch.Tensor) -> None:
        self.count += flat.shape[0]
        self.sum += flat.sum(dim=0, dtype=torch.float32).double()
        self.sum_sq += torch.linalg.vector_norm(flat, 2, dim=0, dtype=torch.float32).double() ** 2
        self.positive += (flat > 0).sum(dim=0)
        self.max = torch.maximum(self.max, flat.amax(dim=0).float())

    def _offer_top(self, unit_acts: torch.Tensor, units: torch.Tensor, windows_of, timer: StageTimer) -> None:
        U, N = unit_acts.shape
        k, device = self.top.capacity, unit_acts.device
        if self.geometry.units_per_block % SEGMENT == 0 and U // SEGMENT > k:
            # Every top-k unit lies in one of the k segments with the best max (ranked in the same total order).
            segment_max = unit_acts.view(U // SEGMENT, SEGMENT, N).amax(dim=1)
            best = torch.topk(value_keys(segment_max, units[::SEGMENT, None]), k, dim=0).indices  # (k, N)
            local = (best[:, None, :] * SEGMENT + torch.arange(SEGMENT, device=device)[None, :, None]).reshape(-1, N)
        else:
            local = torch.arange(U, device=device)[:, None].expand(U, N)
        values = unit_acts.gather(0, local)
        keys = value_keys(values, units[local])
        best = torch.topk(keys, min(k, keys.shape[0]), dim=0).indices
        local = local.gather(0, best)
        self.top.offer(keys.gather(0, best), units[local], values.gather(0, best), local, windows_of, timer)

    def _offer_sample(self, unit_acts: torch.Tensor, units_np: np.ndarray, units: torch.Tensor, windows_of,
                      timer: StageTimer) -> None:
        if self.pool.capacity == 0:
            return
        U, device = unit_acts.shape[0], unit_acts.device
        hashes = torch.from_numpy(unit_hash(units_np, self.seed)).to(device)
        sorted_hashes, order = torch.sort(hashes)
        start = torch.searchsorted(sorted_hashes, self.arc_start)  # (N,) where each feature's arc begins
        rows = (start[None, :] + torch.arange(min(U, self.pool.capacity), device=device)[:, None]) % U
        local = order[rows]  # (C, N), keys decreasing down the rows
        keys = -((hashes[local] + self.offsets[None, :]) & MASK62)
        n_better = (keys > self.pool.worst()[None, :]).sum(dim=0)
        c = int(n_better.max())
        if c:
            local, keys = local[:c], keys[:c]
            self.pool.offer(keys, units[local], unit_acts.gather(0, local), local, windows_of, timer)

    def _with_context(self, flat: torch.Tensor, block_ids: np.ndarray, neighbours) -> torch.Tensor:
        """The batch's activations with window/2 positions of the block before and window - window/2 of the block
        after around them (NaN beyond the stream's ends)."""
        ids = np.asarray(block_ids)
        if neighbours is None or (len(ids) > 1 and np.any(np.diff(ids) != 1)):
            raise ValueError("stream windows need batches of consecutive blocks with their neighbours' activations "
                             "(crate.interp.collect.with_neighbours)")
        w, (before, after) = self.geometry.window, neighbours
        left, right = w // 2, w - w // 2
        nan = lambda n: torch.full((n, flat.shape[1]), float("nan"), device=flat.device, dtype=flat.dtype)
        return torch.cat([nan(left) if before is None else before[before.shape[0] - left:].to(flat.dtype), flat,
                          nan(right) if after is None else after[:right].to(flat.dtype)])

    def _batch_windows(self, flat: torch.Tensor, local: torch.Tensor, T: int, shift: int = 0) -> torch.Tensor:
        """(E, N) batch-local unit indices -> (E, N, window) activations of their windows; `flat` starts `shift`
        positions before the batch's first token."""
        E, N = local.shape
        per_block, w = self.geometry.units_per_block, self.geometry.window
        start = (local // per_block) * T + self.geometry.window_start(local % per_block) + shift
        index = start[:, None, :] + torch.arange(w, device=local.device)[None, :, None]  # (E, w, N)
        return flat.gather(0, index.reshape(E * w, N)).view(E, w, N).permute(0, 2, 1)

    # -- shards ----------------------------------------------------------------------------------------------
    def merge(self, other: "LayerCollector") -> "LayerCollector":
        if other.layer != self.layer or not np.array_equal(other.features, self.features):
            raise ValueError("can only merge collectors of the same layer and features")
        other = other.to(self.top.keys.device)
        self.top.merge(other.top)
        self.pool.merge(other.pool)
        self.count += other.count
        self.sum += other.sum
        self.sum_sq += other.sum_sq
        self.positive += other.positive
        self.max = torch.maximum(self.max, other.max)
        return self

    def to(self, device: torch.device | str) -> "LayerCollector":
        for name in ("top", "pool", "offsets", "arc_start", "sum", "sum_sq", "positive", "max"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    # -- the end ---------------------------------------------------------------------------------------------
    def selections(self) -> dict[str, np.ndarray]:
        """Every selected record of this layer as columns: feature, kind, rank, bin, activation, unit, windows."""
        spec = self.spec
        order, valid = self.top.ranked()
        parts = [self._rows(self.top, order, valid, "top", np.arange(order.shape[0])[:, None], -1)]
        order, valid = self.pool.ranked()
        in_key_order = np.broadcast_to(np.arange(order.shape[0])[:, None], order.shape)
        parts.append(self._rows(self.pool, order, valid & (in_key_order < spec.random), "random", in_key_order, -1))
        if spec.n_bins:
            # ranked among the quantile pool alone: with the random records in the ranking, tied zeros sort by
            # sampling key and the random records (drawn first) take the bottom bin's ranks
            eligible = valid & (in_key_order >= spec.random)
            bins, _ = self._pool_bins(order, eligible)
            for b in range(spec.n_bins):
                member = eligible & (bins == b)
                rank = np.cumsum(member, axis=0) - 1
                parts.append(self._rows(self.pool, order, member & (rank < spec.per_quantile), "quantile", rank, b))
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

    def _rows(self, slots: SlotSet, order: np.ndarray, take: np.ndarray, kind: str, rank: np.ndarray, bin: int):
        """Columns of the records `take` marks; only their windows leave the device."""
        r, f = np.nonzero(take)
        slot = order[r, f]
        index = (torch.from_numpy(slot).to(slots.keys.device), torch.from_numpy(f).to(slots.keys.device))
        return {"feature": self.features[f], "kind": np.full(len(r), kind), "rank": np.broadcast_to(rank, take.shape)[r, f],
                "bin": np.full(len(r), bin), "activation": slots.values[index].cpu().numpy(),
                "unit": slots.units[index].cpu().numpy(), "windows": slots.windows[index].float().cpu().numpy()}

    def _pool_bins(self, order: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per pool slot (in key order): its quantile bin (-1/n_bins outside), and the per-feature sorted values."""
        values = np.take_along_axis(self.pool.values.cpu().numpy(), order, axis=0).astype(np.float64)
        values = np.where(valid, values, np.inf)  # empty slots rank last
        by_value = np.argsort(values, axis=0, kind="stable")  # ties: earlier in sampling order first
        rank = np.empty_like(by_value)
        np.put_along_axis(rank, by_value, np.arange(values.shape[0])[:, None], axis=0)
        m = np.maximum(valid.sum(axis=0), 1)
        bins = np.searchsorted(self.spec.quantile_edges, (rank + 0.5) / m, side="right") - 1
        bins = np.where(valid, bins, -1)
        return bins, np.take_along_axis(values, by_value, axis=0)

    def statistics(self) -> dict[str, np.ndarray]:
        """Per feature: count, mean, variance, density (fraction > 0), max, and quantile boundaries from the pool."""
        count = max(self.count, 1)
        mean = (self.sum / count).cpu().numpy()
        variance = np.maximum((self.sum_sq / count).cpu().numpy() - mean**2, 0.0)
        n = len(self.features)
        boundaries = np.full((n, len(self.spec.quantile_edges)), np.nan, dtype=np.float32)
        order, valid = self.pool.ranked()
        if self.spec.n_bins and valid.any():
            _, sorted_values = self._pool_bins(order, valid)
            m = valid.sum(axis=0)
            index = np.minimum((np.asarray(self.spec.quantile_edges)[:, None] * m).astype(np.int64), np.maximum(m - 1, 0))
            boundaries = np.where(m[None, :] > 0, np.take_along_axis(sorted_values, index, axis=0), np.nan).T
        return {"feature": self.features, "count": np.full(n, self.count), "mean": mean, "variance": variance,
                "density": (self.positive.double() / count).cpu().numpy(), "max": self.max.cpu().numpy(),
                "quantile_boundaries": boundaries.astype(np.float32)}


def batched(blocks: Iterable[np.ndarray], batch_blocks: int, first_block: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(block_ids, tokens (B, T)) batches of consecutive blocks, numbered from `first_block`."""
    ids, batch = [], []
    for i, block in enumerate(blocks, start=first_block):
        ids.append(i)
        batch.append(np.asarray(block))
        if len(batch) == batch_blocks:
            yield np.array(ids), np.stack(batch)
            ids, batch = [], []
    if batch:
        yield np.array(ids), np.stack(batch)


def with_neighbours(batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[tuple]:
    """Stream windows: each batch of consecutive blocks with the tokens of the block just before and just after it
    (None at the stream's start and end), so windows can run across its edges."""
    out = []
    for i, (block_ids, tokens) in enumerate(batches):
        before = batches[i - 1][1][-1] if i > 0 else None
        after = batches[i + 1][1][0] if i + 1 < len(batches) else None
        out.append((block_ids, tokens, before, after))
    return out


class RecordCollector:
    """Selections of several layers plus the tokens of every block seen (for the records' windows)."""

    def __init__(self, spec: CollectionConfig, features: dict[int, np.ndarray], seed: int = 0,
                 device: torch.device | str = "cpu"):
        self.spec, self.seed, self.device = spec, seed, torch.device(device)
        self.layers = {layer: LayerCollector(layer, ids, spec, seed, self.device) for layer, ids in features.items()}
        self.tokens: dict[int, np.ndarray] = {}

    def update(self, block_ids: np.ndarray, tokens: np.ndarray, activations: dict[int, torch.Tensor],
               timer: StageTimer = NO_TIMER, neighbours: dict[int, tuple] | None = None) -> None:
        """`neighbours` (stream windows): per layer, the activations of the blocks before and after the batch."""
        repeated = [int(b) for b in block_ids if int(b) in self.tokens]
        if repeated:
            raise ValueError(f"blocks {repeated[:5]} were already collected: shards must be disjoint")
        for block, row in zip(block_ids, tokens):
            self.tokens[int(block)] = np.asarray(row, dtype=np.int32)
        for layer, collector in self.layers.items():
            collector.update(activations[layer], block_ids, timer, None if neighbours is None else neighbours[layer])

    def merge(self, other: "RecordCollector") -> "RecordCollector":
        overlap = self.tokens.keys() & other.tokens.keys()
        if overlap:
            raise ValueError(f"cannot merge collectors that both saw blocks {sorted(overlap)[:5]}")
        for layer, collector in self.layers.items():
            collector.merge(other.layers[layer])
        self.tokens.update(other.tokens)
        return self

    def to(self, device: torch.device | str) -> "RecordCollector":
        self.device = torch.device(device)
        for collector in self.layers.values():
            collector.to(device)
        return self

    @property
    def n_blocks(self) -> int:
        return len(self.tokens)

    def _stream(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted block ids, their tokens stacked (n_blocks, T)), built once per set of blocks."""
        if getattr(self, "_stacked", (None,))[0] != len(self.tokens):
            block_ids = np.array(sorted(self.tokens), dtype=np.int64)
            stream = np.stack([self.tokens[b] for b in block_ids]) if len(block_ids) else np.zeros((0, 1), np.int32)
            self._stacked = (len(self.tokens), block_ids, stream)
        return self._stacked[1], self._stacked[2]

    def records(self, layer: int) -> dict[str, np.ndarray]:
        """Columns of RECORDS_SCHEMA for one layer (tokens/activations as (R, window) arrays)."""
        s = self.layers[layer].selections()
        geometry, per_block = self.layers[layer].geometry, self.layers[layer].geometry.units_per_block
        block, in_block = np.divmod(s["unit"], per_block)
        start = geometry.window_start(in_block)
        if self.spec.windows == "fragments":
            focus = np.argmax(s["windows"], axis=1)  # the fragment's (first) max token
        else:
            focus = in_block - start
        block_ids, stream = self._stream()
        w = self.spec.window
        if self.spec.windows == "stream" and len(block_ids) and block_ids[-1] - block_ids[0] != len(block_ids) - 1:
            raise ValueError("stream windows need the whole stream's blocks (consecutive block ids)")
        flat_start = np.searchsorted(block_ids, block) * geometry.block_length + start + w
        padded = np.concatenate([np.full(w, -1, np.int32), stream.reshape(-1), np.full(w, -1, np.int32)])
        windows = np.lib.stride_tricks.sliding_window_view(padded, w)  # a view, no copy
        tokens = windows[flat_start]
        return {"layer": np.full(len(block), layer), "neuron": s["feature"], "kind": s["kind"], "rank": s["rank"],
                "bin": s["bin"], "activation": s["activation"], "block": block, "start": start, "focus": focus,
                "tokens": tokens, "activations": s["windows"]}


def records_precision(device: torch.device | str) -> str:
    """The precision records collected on `device` have (see the module's docstring)."""
    return "float32+tf32" if torch.device(device).type == "cuda" else "float32"


@contextmanager
def records_matmuls(device: torch.device | str) -> Iterator[None]:
    """float32 matmuls as `records_precision(device)` says (TF32 on CUDA), the previous settings restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = torch.device(device).type == "cuda"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def collect(model, batches: Iterable[tuple[np.ndarray, np.ndarray]], spec: CollectionConfig, source,
            features: dict[int, np.ndarray], seed: int = 0, device: torch.device | str | None = None,
            timer: StageTimer = NO_TIMER, progress: Callable[[int], None] | None = None) -> RecordCollector:
    """Run `model` over `batches` of (block_ids, tokens) — for stream windows (block_ids, tokens, before, after)
    from `with_neighbours`, the neighbours run in the same forward pass — and collect records of `features` ({layer: feature ids})
    of the feature `source`: the forward in the model's own dtype (float32 for a loaded checkpoint) without
    autocast, the selections in float32 (see `records_precision`)."""
    device = torch.device(device or next(model.parameters()).device)
    model = model.to(device).eval()
    collector = RecordCollector(spec, features, seed, device)
    layers = sorted(features)
    index = {layer: None if np.array_equal(ids, np.arange(len(ids))) else torch.tensor(ids, device=device)
             for layer, ids in features.items()}  # None: the first len(ids) features, no gather needed
    for block_ids, tokens, *around in batches:
        context = [row for row in around if row is not None]  # stream windows: the neighbouring blocks
        with timer("forward"), torch.no_grad(), torch.autocast(device.type, enabled=False), records_matmuls(device):
            rows = np.concatenate([np.asarray(tokens)] + [np.asarray(row)[None] for row in context])
            acts = source.activations(model, torch.tensor(rows, dtype=torch.int64, device=device), layers)
            acts = {layer: (a[..., :len(features[layer])] if index[layer] is None else a.index_select(-1, index[layer]))
                    .float() for layer, a in acts.items()}
        neighbours = None
        if around:
            n = len(block_ids)
            extra = iter(range(n, n + len(context)))
            slots = [None if row is None else next(extra) for row in around]
            neighbours = {layer: tuple(None if i is None else a[i] for i in slots) for layer, a in acts.items()}
            acts = {layer: a[:n] for layer, a in acts.items()}
        collector.update(block_ids, tokens, acts, timer, neighbours)
        if progress is not None:
            progress(len(block_ids))
    return collector
