"""The products of a decode step: cuBLAS, or the Triton GEMV (``kernels/gemv.py``) for the weight
shapes where it times faster on the card at hand.

Why per shape and per card: cuBLAS picks a kernel per shape, and some of its batch-1 choices
stream the weight well below the copy bandwidth (on an H200, 37-44% for a 4096 x 4096 ``wo``)
while others reach 95%; the Triton kernel wins on some shapes and loses on others, differently
on each GPU. ``choose_linears`` times both on the stage's own weights at its first decode capture.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from hyperlane_lab.models.stage import TorchStage

__all__ = ["LinearFn", "apply_pins", "choose_linears", "env_flag", "gemv_pins", "make_linear"]

log = logging.getLogger("hyperlane_lab.models.cuda_decode")

LinearFn = Callable[..., torch.Tensor]  # F.linear(x, w, bias=None)


def env_flag(name: str, default: bool, environ: Mapping[str, str] = os.environ) -> bool:
    """A switch from the environment (or ``environ``, e.g. a child process's): unset -> ``default``; "0",
    "false", "no", "off", "" -> off."""
    v = environ.get(name)
    return default if v is None else v.strip().lower() not in ("0", "false", "no", "off", "")


def make_linear(table: dict[tuple[int, int], Any], pdl: bool = False, prefetch: bool = False) -> LinearFn:
    """``F.linear`` that sends one-row products with a weight shape in ``table`` (value: a
    ``kernels.gemv.GemvConfig``, or None for cuBLAS) to the Triton GEMV kernel; ``pdl``: launched
    with programmatic dependent launch (``kernels/pdl.py``, sm_90+), ``prefetch`` reading the first
    weight tile before the wait."""
    if not any(table.values()):
        return F.linear
    from hyperlane_lab.codecs._kernels import kernel_module  # source checkouts too

    # Launched outside the torch.compile graph of a layer (a graph break, free once the step is a
    # CUDA graph): dynamo may turn the config's ints symbolic on a recompile, which its Triton-kernel
    # tracing cannot take (seen on an H200 with the split-K configs).
    gemv = torch.compiler.disable(kernel_module("gemv").gemv)

    def lin(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        cfg = table.get((w.shape[0], w.shape[1]))
        if cfg is None or x.numel() != w.shape[1]:  # batch > 1 (or a shape cuBLAS does better)
            return F.linear(x, w, b)
        return gemv(x, w, b, cfg, pdl=pdl, prefetch=prefetch)

    return lin


def gemv_pins(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """``HYPERLANE_GEMV_PIN``: weight shapes whose decode product is pinned rather than chosen by timing,
    as ``NxK=NAME`` items separated by commas (``4096x4096=8x512w4s3,4096x11008=cublas``; N output rows, K
    inputs; names as in the timing tables, ``kernels/gemv.config_name``), e.g. to give two workers the same
    kernels. Raises ValueError on an item that is not ``SHAPE=NAME``, a shape given two names, or a name
    that is no GEMV config (listing them; not checked without Triton, where pins do not apply)."""
    text = environ.get("HYPERLANE_GEMV_PIN", "").strip()
    pins: dict[str, str] = {}
    for item in filter(None, (i.strip() for i in text.split(","))):
        shape, sep, name = (p.strip() for p in item.partition("="))
        m = re.fullmatch(r"(\d+)x(\d+)", shape)
        if not sep or m is None or not name:
            raise ValueError(
                f"HYPERLANE_GEMV_PIN: {item!r} is not SHAPE=CONFIG (e.g. 4096x4096=8x512w4s3 or 4096x4096=cublas)"
            )
        shape = f"{int(m[1])}x{int(m[2])}"
        if pins.get(shape, name) != name:
            raise ValueError(
                f"HYPERLANE_GEMV_PIN: {shape} is pinned twice ({pins[shape]}, {name}); give it once"
            )
        pins[shape] = name
    if not pins:
        return pins
    names = _config_names()
    bad = sorted({n for n in pins.values() if n != "cublas"} - set(names)) if names else []
    if bad:
        raise ValueError(f"HYPERLANE_GEMV_PIN: unknown config(s) {bad}; valid: cublas, {', '.join(names)}")
    return pins


def _config_names() -> list[str]:
    """The Triton GEMV configs' names, or [] without Triton (then pins are not checked here)."""
    try:
        from hyperlane_lab.codecs._kernels import kernel_module

        gk = kernel_module("gemv")
    except Exception:
        return []
    return list(gk.configs_by_name())


def apply_pins(
    table: dict[tuple[int, int], Any],
    choice: dict[str, Any],
    pins: Mapping[str, str],
    by_name: Mapping[str, Any],
    timed: Callable[[int], Iterable[str]] | None = None,
) -> None:
    """Set each pinned shape this stage has (``table``) to its pinned config (``by_name[name]``, None for
    "cublas"), marking ``choice[shape]["pinned"]``. A pinned config that failed where the others were timed
    (``choice[shape]["us"]`` holds timings but not its own, e.g. too many registers for this card) keeps the
    timed choice, marked ``"pin_failed"`` (``timed(n)``: the config names timed for n output rows; default
    all). Pins for shapes the stage lacks are listed under ``choice["pins_unmatched"]`` and logged (a split
    stage holds no LM head; a typo shows here)."""
    for n, k in list(table):
        key = f"{n}x{k}"
        name = pins.get(key)
        if name is None:
            continue
        entry = choice.setdefault(key, {"us": {}})
        times = entry.get("us", {})
        was_timed = name in (by_name if timed is None else set(timed(n)))
        if name != "cublas" and len(times) > 1 and name not in times and was_timed:
            log.warning("HYPERLANE_GEMV_PIN: %s=%s failed when timed; keeping the timed choice", key, name)
            entry["pin_failed"] = name
            continue
        cfg = None if name == "cublas" else by_name[name]
        table[(n, k)] = cfg
        entry.update(triton=cfg is not None, pinned=name)
    unmatched = sorted(set(pins) - {f"{n}x{k}" for n, k in table})
    if unmatched:
        log.warning("HYPERLANE_GEMV_PIN: %s not in this stage's weight shapes %s", unmatched, sorted(choice))
        choice["pins_unmatched"] = unmatched


def choose_linears(
    st: TorchStage, pins: Mapping[str, str] | None = None
) -> tuple[dict[tuple[int, int], Any], dict[str, Any]]:
    """(weight shape -> ``GemvConfig`` or None for cuBLAS, per-shape timings in µs) for a CUDA
    stage; empty on CPU or with ``HYPERLANE_TRITON_GEMV=0``. Failures keep cuBLAS. ``pins``
    (``gemv_pins``): shapes whose config is set rather than chosen (still timed, for the report)."""
    table: dict[tuple[int, int], Any] = {}
    choice: dict[str, Any] = {}
    if st.device.type != "cuda" or not env_flag("HYPERLANE_TRITON_GEMV", True):
        if pins and st.device.type == "cuda":
            log.warning("HYPERLANE_GEMV_PIN ignored: HYPERLANE_TRITON_GEMV=0 keeps every product on cuBLAS")
        return table, choice
    groups: dict[tuple[int, int], list[torch.Tensor]] = {}
    mats = [t for lw in st.weights.layers for t in (lw.wqkv, lw.wo, lw.w_gate_up, lw.w_down)]
    if st.weights.lm_head is not None:
        mats.append(st.weights.lm_head)
    for t in mats:
        groups.setdefault((t.shape[0], t.shape[1]), []).append(t)
    try:
        from hyperlane_lab.codecs._kernels import kernel_module

        gk = kernel_module("gemv")
        choose_config = gk.choose_config
    except Exception as e:  # no Triton here: cuBLAS
        ignored = "; HYPERLANE_GEMV_PIN ignored" if pins else ""
        log.warning("stage %s: Triton GEMV not available (%s)%s", st.span, e, ignored)
        groups = {}
    with torch.cuda.device(st.device):
        for (n, k), ws in sorted(groups.items()):
            try:  # timed on the stage's own weights: no extra memory
                cfg, times = choose_config(ws)
            except Exception as e:  # e.g. out of memory: this shape stays on cuBLAS
                log.warning("stage %s: GEMV timing for %dx%d failed (%s)", st.span, n, k, e)
                cfg, times = None, {}
            table[(n, k)] = cfg
            choice[f"{n}x{k}"] = {"triton": cfg is not None, "us": times}
    if groups and pins:
        by_name = gk.configs_by_name()
        apply_pins(table, choice, pins, by_name, lambda n: map(gk.config_name, gk.candidates(n)))
    if groups:
        log.info("stage %s: decode GEMV choice %s", st.span, choice)
    return table, choice
