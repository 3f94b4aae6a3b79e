"""The all-Triton decode layer's GEMV configs chosen by timing the whole decode step, not each product alone.

Why: ``triton_layer_configs`` takes, per product role, the config that timed fastest *alone*. Inside the
step the products run back to back, launched with programmatic dependent launch, each starting while the one
before it drains, and that changes the order. On an H200 (Llama-2-7B, bench/tail_ab.py, s24b) the five q/k/v
configs that timed within 4% of each other alone (s23e) gave 255.0-266.7 tok/s in the step: the one chosen alone
(16x256w4s4) ran 261.2, another (8x512w4s3) 266.7 (+2.1%).

How: start from the configs chosen alone; for each role in turn (q/k/v, wo, gate/up, down) try that role's
other configs that timed within ``margin`` of its best alone (at most ``limit``, fastest first), the other
roles held at the current choice; a trial replaces the current choice when it is at least ``min_gain``
faster. One pass (coordinate descent): at most len(roles) x limit timings, ~10-12 s for Llama-2-7B on an H200
once Triton's disk cache holds the kernels. Each timing captures the stage's decode step (the graph a session
replays, on a scratch cache) and runs it as a greedy session does (``StepTimer``'s "session" mode), in rounds
alternating with the current choice's graph, so drift between the two cancels. Timing bare back-to-back
replays instead ranked the configs differently and picked a slower set (s24c/s24d: +0.7-1.0% against +4.6% for
session timing, both over the configs chosen alone, in one process). Roles pinned by ``HYPERLANE_GEMV_PIN``
keep their pins. ``HYPERLANE_LAYER_TUNE=0`` keeps the configs chosen alone. The timer captures the staged
step; a worker decoding from frames replays a wire-mode graph of the same layers (``decode_wire``), which has
its own copies at both ends and was not timed. Tuning runs at the stage's first batch-1 capture, so that step
waits for it (the GEMVs' alone timings also run then).

``candidates`` and ``descend`` are pure (tests check them against brute force); ``StepTimer`` does the timing
on a ``GraphDecoder``.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from hyperlane_lab.models.decode_fused import _ROLES, runnable_times
from hyperlane_lab.models.sessions import SessionCache

if TYPE_CHECKING:
    from hyperlane_lab.models.cuda_decode import GraphDecoder
    from hyperlane_lab.models.layers import LayerWeights

__all__ = ["StepTimer", "candidates", "descend", "tune_layer"]

log = logging.getLogger(__name__)

ROLES = _ROLES  # the layer's product roles


def candidates(
    shapes: Mapping[str, tuple[int, int]],
    choice: Mapping[str, Any],
    base: Mapping[str, Any],
    by_name: Mapping[str, Any],
    margin: float = 0.15,
    limit: int = 4,
) -> dict[str, list[Any]]:
    """Per role (``shapes``: role -> weight shape), the configs other than ``base[role]`` worth a step timing:
    those timed alone (``choice[shape]["us"]``, config name -> µs) within ``margin`` of the role's best
    Triton config alone, runnable in the role (no split-K where the norm is folded in), fastest first (ties
    by name), at most ``limit``. A pinned shape (``choice[shape]["pinned"]``) gets none."""
    out: dict[str, list[Any]] = {}
    for role, (n, k) in shapes.items():
        entry = choice.get(f"{n}x{k}", {})
        if entry.get("pinned") is not None:
            out[role] = []
            continue
        times = runnable_times(role, entry.get("us", {}), by_name)
        if not times:
            out[role] = []
            continue
        best = min(times.values())
        near = sorted((t, name) for name, t in times.items() if t <= best * (1 + margin))
        picked = [by_name[name] for _, name in near if by_name[name] != base[role]]
        out[role] = picked[:limit]
    return out


Compare = Callable[[dict[str, Any], dict[str, Any]], "tuple[float, float] | None"]


def descend(
    base: Mapping[str, Any],
    cands: Mapping[str, Sequence[Any]],
    compare: Compare,
    min_gain: float = 0.003,
    name: Callable[[Any], str] = str,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One coordinate-descent pass from ``base`` (role -> config): for each role in ``base``'s order and each
    of its ``cands``, ``compare(current, trial)`` gives (trial µs, current µs) or None (the trial failed);
    the trial becomes current when it is more than ``min_gain`` faster. Returns the final configs and one
    record per trial (role, config name, µs, current µs, kept)."""
    cur = dict(base)
    trials: list[dict[str, Any]] = []
    for role in base:
        for cfg in cands.get(role, ()):
            trial = {**cur, role: cfg}
            got = compare(cur, trial)
            rec: dict[str, Any] = {"role": role, "config": name(cfg), "kept": False}
            if got is not None:
                t_new, t_cur = got
                rec.update(us=t_new, current_us=t_cur, kept=t_new < t_cur * (1 - min_gain))
                if rec["kept"]:
                    cur = trial
            trials.append(rec)
    return cur, trials


class StepTimer:
    """Times a ``GraphDecoder``'s batch-1 decode step with given layer configs. Each config set's step is captured
    as a session's graph is (``GraphDecoder._capture``, on a scratch cache of the pooled size for ``max_len``
    positions) and then run in one of two ways (``mode``):

    - "session": as a greedy run-ahead session steps (``generate`` on CUDA): ``GraphDecoder.step`` with the
      position staged from the host and the previous step's greedy id as the input (a split stage: a hidden
      state on the device), the ids copied back to pinned memory after each step; positions from ``position``
      on, cycling over 8.
    - "replay": bare back-to-back replays of the graph. On an H200 it ranked configs unlike the session loop.

    ``make_layer(cfgs)`` builds the layer. Each comparison first drops every graph (and scratch cache) but the
    current choice's."""

    def __init__(
        self,
        gd: GraphDecoder,
        make_layer: Callable[[dict[str, Any]], Any],
        name: Callable[[Any], str] = str,
        mode: str = "session",
        rounds: int = 6,
        steps: int = 8,
        max_len: int = 64,
        position: int = 16,
    ) -> None:
        if mode not in ("session", "replay"):
            raise ValueError(f"unknown step timing mode {mode!r}; valid: session, replay")
        self.gd, self.make_layer, self.name, self.mode = gd, make_layer, name, mode
        self.rounds, self.steps, self.max_len, self.position = rounds, steps, max_len, position
        self._graphs: dict[tuple[str, ...], Any] = {}
        self._pos = [torch.tensor([[position + i]]) for i in range(8)]  # "session" mode's host positions
        self._host: torch.Tensor | None = None  # its pinned copy of the ids (made at the first timing)

    def key(self, cfgs: Mapping[str, Any]) -> tuple[str, ...]:
        return tuple(self.name(cfgs[r]) for r in ROLES)

    def graph(self, cfgs: dict[str, Any]) -> Any:
        """The step's graph with these configs (captured once) and its scratch cache."""
        k = self.key(cfgs)
        if k not in self._graphs:
            gd, st = self.gd, self.gd.stage
            slots = gd.cache_len(self.max_len)
            cache = SessionCache.zeros(1, slots, len(st.span), st.spec, st.dtype, st.device)
            saved = gd._tlayer, gd.captures
            gd._tlayer = self.make_layer(cfgs)
            try:
                cache.graph = gd._capture(cache, degrade=False)
            finally:
                gd._tlayer, gd.captures = saved  # the decoder's own layer and count are untouched
            g = cache.graph
            # a real position, so the attention reads keys (the capture's positions are padding)
            g.io[1].fill_(self.position)
            if st.is_first:
                g.io[0].fill_(1)
            if g.greedy is not None:  # "session" mode's first input id: not written until the first replay
                g.greedy.fill_(1)
            self._graphs[k] = (g, cache)
        return self._graphs[k]

    def _run(self, g: Any, cache: SessionCache, n: int) -> None:
        if self.mode == "replay":
            for _ in range(n):
                g.graph.replay()
            return
        gd, st = self.gd, self.gd.stage
        if st.is_first:
            x = g.greedy[:1].view(1, 1) if g.greedy is not None else g.io[0].view(1, 1).clone()
        else:
            x = torch.zeros_like(g.x_in)
        replays = gd.replays
        if self._host is None:
            self._host = torch.empty(2, dtype=torch.int64, pin_memory=True)
        for i in range(n):
            gd.step(cache, x, self._pos[i % len(self._pos)])
            if g.greedy is not None:
                self._host.copy_(g.greedy, non_blocking=True)
        gd.replays = replays

    def compare(self, cur: dict[str, Any], trial: dict[str, Any]) -> tuple[float, float] | None:
        """(trial µs, current µs) a step: the two run in alternating rounds, medians; None when the trial's
        capture fails (logged). Raises when the current choice's capture or the timing fails."""
        keep = self.key(cur)
        self._graphs = {k: v for k, v in self._graphs.items() if k == keep}
        current = self.graph(cur)
        try:
            runs: tuple[tuple[Any, SessionCache], ...] = current, self.graph(trial)
        except Exception as e:
            log.warning("stage %s: layer tuning skipped %s (%s)", self.gd.stage.span, self.key(trial), e)
            return None
        times: list[list[float]] = [[], []]
        with torch.cuda.device(self.gd.stage.device):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            for g, cache in runs:  # warm
                self._run(g, cache, 2)
            for r in range(self.rounds):
                for i in (0, 1) if r % 2 == 0 else (1, 0):
                    start.record()
                    self._run(runs[i][0], runs[i][1], self.steps)
                    end.record()
                    end.synchronize()
                    times[i].append(start.elapsed_time(end) * 1e3 / self.steps)
        return statistics.median(times[1]), statistics.median(times[0])

    def close(self) -> None:
        self._graphs.clear()


def role_shapes(w: LayerWeights) -> dict[str, tuple[int, int]]:
    """Role -> weight shape (N, K) of one layer."""
    return {r: (int(getattr(w, r).shape[0]), int(getattr(w, r).shape[1])) for r in ROLES}


def tune_layer(
    gd: GraphDecoder, cfgs: dict[str, Any], make: Callable[[dict[str, Any]], Any]
) -> dict[str, Any]:
    """``cfgs`` (the configs timed fastest alone) improved by timing ``gd``'s whole step, on a CUDA stage unless
    ``HYPERLANE_LAYER_TUNE=0`` (``gd.layer_tune_enabled``); ``make(cfgs)`` builds the layer. The trials go to
    ``gd.gemv_choice["triton_layer_tune"]``; the result is kept (``gd._tuned``) per launch mode, starting
    configs, pins, timing mode, tail and compiling, so ``configure()`` does not time them again. A failure
    (the starting configs' capture, a timing) keeps ``cfgs`` and is recorded in ``gd.fallbacks``; a call
    made while tuning (a nested capture) returns ``cfgs``."""
    if not gd.layer_tune_enabled or gd.stage.device.type != "cuda" or gd._tuning:
        if not gd._tuning:
            gd.gemv_choice.pop("triton_layer_tune", None)  # no stale report for configs not tuned
        return cfgs
    from hyperlane_lab.codecs._kernels import kernel_module

    gk = kernel_module("gemv")
    name = gk.config_name
    mode = gd.layer_tune_mode
    # what the timed step depends on besides the layer: the launch mode, pins, the tail, compiling
    key = (
        gd.pdl_mode(),
        tuple(name(cfgs[r]) for r in ROLES),
        tuple(sorted(gd.gemv_pins.items())),
        mode,
        gd.triton_greedy_enabled,
        gd.compile_layers,
    )
    if key not in gd._tuned:
        t0 = time.perf_counter()
        report: dict[str, Any] = {"alone": {r: name(c) for r, c in cfgs.items()}, "mode": mode}
        gd._tuning = True
        timer = StepTimer(gd, make, name, mode)
        try:
            shapes = role_shapes(gd.stage.weights.layers[0])
            cands = candidates(shapes, gd.gemv_choice, cfgs, gk.configs_by_name())
            best, report["trials"] = descend(cfgs, cands, timer.compare, name=name)
        except Exception as e:  # the configs chosen alone; the real capture finds out whether they run
            why = f"{type(e).__name__}: {e}"[:300]
            log.warning(
                "stage %s: layer tuning failed (%s); keeping the configs timed alone", gd.stage.span, why
            )
            gd.fallbacks.append(f"layer tuning: {why}")
            best, report["error"] = cfgs, why
        finally:
            timer.close()
            gd._tuning = False
        report["chosen"] = {r: name(c) for r, c in best.items()}
        report["seconds"] = round(time.perf_counter() - t0, 3)
        log.info("stage %s: decode layer configs tuned in the step: %s", gd.stage.span, report)
        gd._tuned[key] = best, report
    best, gd.gemv_choice["triton_layer_tune"] = gd._tuned[key]
    return best
