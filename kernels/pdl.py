"""Programmatic dependent launch (PDL) for the decode kernels: one switch, checked once.

On Hopper and later (sm_90+), a kernel launched with PDL may start while the kernel before it on the stream
still runs: its programs become resident and wait in ``griddepcontrol.wait`` (Triton's ``gdc_wait``) until
that kernel has finished and its writes are visible. The kernel before it lets it start early with
``griddepcontrol.launch_dependents`` (``gdc_launch_dependents``). What is saved is the launch latency and
ramp-up between two kernels of a decode step's chain (see ``bench/pdl_probe.py``).

The rule every kernel here follows when its ``PDL`` switch is on: ``gdc_launch_dependents()`` then
``gdc_wait()`` before its first load or store of anything another kernel of the step writes (inputs, outputs,
the new cache entry); what no kernel of the step writes may be read before the wait: weights
(``gemv(prefetch=True)``), and in the attention kernel the positions, the RoPE tables and the cache slots
before the position. Those were written before the step's chain began: a chain starts after a plainly
launched kernel or a copy inside the step's graph (the embedding, the wire input's copy), or is the graph's
first node (a later stage's first product), and a graph launch waits for all earlier work on its stream; the
positions are copied in before or at the graph's start, and earlier steps' cache entries were written by
earlier replays. Since each kernel of a chain waits for the one before it to complete, and completes only
after its own wait, every earlier kernel has completed too. An early read may run while several earlier
kernels still run, so nothing in a decode step may write a weight (a dequantizing or merging kernel would race
with it), the positions, or a cache slot other than the step's own.
A kernel launched without PDL after one launched with it waits for it as usual.

Layout: ``gdc_wait`` / ``gdc_launch_dependents`` (re-exported from Triton, None where Triton lacks them) ->
``pdl_supported`` (the device check) -> ``launch_options`` (the launch keyword).
"""

from __future__ import annotations

import os
from typing import Any

import torch

try:  # Triton >= 3.4
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: PDL is never asked for
    gdc_launch_dependents = gdc_wait = None

__all__ = ["gdc_launch_dependents", "gdc_wait", "launch_options", "pdl_supported"]


def pdl_supported(device: torch.device | str) -> bool:
    """True where a kernel may be launched with PDL: a CUDA device of compute capability 9.0 or later,
    compiled kernels (not ``TRITON_INTERPRET=1``) and a Triton that has the grid dependency controls."""
    device = torch.device(device)
    if device.type != "cuda" or gdc_wait is None or os.environ.get("TRITON_INTERPRET", "") == "1":
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def launch_options(pdl: bool, device: torch.device, who: str) -> dict[str, Any]:
    """The launch keywords for a kernel whose ``PDL`` switch is ``pdl``; ValueError where it cannot be."""
    if not pdl:
        return {}
    if not pdl_supported(device):
        raise ValueError(
            f"{who}: pdl=True needs a CUDA device of compute capability 9.0+ (Hopper), compiled kernels and "
            f"Triton >= 3.4, got {device}; pass pdl=False"
        )
    return {"launch_pdl": True}
