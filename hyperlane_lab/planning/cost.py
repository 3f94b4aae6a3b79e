"""Analytic cost model: roofline time per layer and stage, link time, memory per stage. All pure.

Roofline: a kernel takes ``max(FLOPs / peak FLOP/s, bytes / memory bandwidth)``. Per decode step
(batch ``b`` sequences, ``c`` tokens of context each) one layer does
``b·(flops_per_token + attn_per_ctx·c)`` FLOPs and moves its weights once (they are shared by
the batch) plus the KV cache it reads, ``b·c·kv_bytes_per_token``, and the row it writes. A
prefill of ``n`` new tokens does ``b·(n·flops_per_token + attn_per_ctx·n(n+1)/2)`` FLOPs (causal
attention) and moves weights once plus the ``b·n`` KV rows it writes. The LM head runs for the last
position only (decode: one token per sequence; prefill: the last prompt token).

Calibrated variant: when a DeviceProfile carries measured ``layer_decode_s`` (batch 1) or
``layer_prefill_s_per_token``, the analytic time is scaled so that it equals the measurement at the
measured point: ``measured × analytic(b, c) / analytic(1, 0)`` for decode, and
``measured × b·n`` for prefill.

Links: ``latency + bytes × codec_ratio / bandwidth``. Stage-to-stage hops carry hidden states
(``b × act_bytes_per_token`` per decode step) compressed by the boundary codec; client hops carry
token ids (4 bytes each) and are not compressed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from hyperlane_lab.types import DeviceProfile, LayerSpan, LinkProfile, ModelProfile

__all__ = [
    "ACT_WORKSPACE_FACTOR",
    "CLIENT",
    "CODEC_RATIOS",
    "TOKEN_ID_BYTES",
    "Links",
    "StageMemory",
    "codec_ratio",
    "hop_bytes",
    "layer_decode_s",
    "layer_prefill_s",
    "link_s",
    "link_serialization_s",
    "roofline_s",
    "stage_decode_s",
    "stage_memory",
    "stage_prefill_s",
]

CLIENT = "client"  # name of the client end of the ring (reserved; no device may use it)
TOKEN_ID_BYTES = 4  # int32 token ids on client hops
# Activation working set of a forward pass as a multiple of the hidden state: residual, normed copy,
# attention output and the (chunked) MLP intermediate. Rough; the headroom covers the rest.
ACT_WORKSPACE_FACTOR = 8

# Bytes on the wire relative to fp16 hidden states (int8/int4 include per-row scales).
CODEC_RATIOS: Mapping[str, float] = MappingProxyType({"fp16": 1.0, "bf16": 1.0, "int8": 0.53, "int4": 0.28})


def codec_ratio(codec: str, ratios: Mapping[str, float] = CODEC_RATIOS) -> float:
    """Wire-size ratio of ``codec`` relative to fp16; ``ratios`` lets new codecs plug in."""
    try:
        ratio = float(ratios[codec])
    except KeyError:
        raise ValueError(
            f"unknown codec {codec!r}; known codecs: {', '.join(sorted(ratios))} "
            "(pass a ratios mapping that includes it)"
        ) from None
    if not 0.0 < ratio <= 4.0:
        raise ValueError(f"codec {codec!r} has ratio {ratio}; a wire-size ratio must be in (0, 4]")
    return ratio


def roofline_s(flops: float, nbytes: float, device: DeviceProfile) -> float:
    return max(flops / device.flops, nbytes / device.mem_bw)


# ------------------------------------------------------------------ one layer


def _analytic_layer_decode_s(
    model: ModelProfile, layer: int, device: DeviceProfile, batch: int, context: int
) -> float:
    flops = batch * (model.layer_flops_per_token[layer] + model.attn_flops_per_token_per_ctx * context)
    nbytes = model.layer_weight_bytes[layer] + batch * (context + 1) * model.kv_bytes_per_token
    return roofline_s(flops, nbytes, device)


def layer_decode_s(
    model: ModelProfile, layer: int, device: DeviceProfile, batch: int, context: int, calibrated: bool = True
) -> float:
    """Time of one decode step of ``layer`` for ``batch`` sequences with ``context`` cached tokens."""
    analytic = _analytic_layer_decode_s(model, layer, device, batch, context)
    if calibrated and device.layer_decode_s is not None:
        ref = _analytic_layer_decode_s(model, layer, device, 1, 0)
        return device.layer_decode_s * (analytic / ref if ref > 0 else 1.0)
    return analytic


def layer_prefill_s(
    model: ModelProfile, layer: int, device: DeviceProfile, batch: int, tokens: int, calibrated: bool = True
) -> float:
    """Time of ``layer`` over a prompt of ``tokens`` tokens for ``batch`` sequences (causal attention)."""
    if calibrated and device.layer_prefill_s_per_token is not None:
        return device.layer_prefill_s_per_token * batch * tokens
    causal_pairs = tokens * (tokens + 1) / 2
    flops = batch * (
        tokens * model.layer_flops_per_token[layer] + model.attn_flops_per_token_per_ctx * causal_pairs
    )
    nbytes = model.layer_weight_bytes[layer] + batch * tokens * model.kv_bytes_per_token
    return roofline_s(flops, nbytes, device)


# ------------------------------------------------------------------ embedding / head


def embed_s(model: ModelProfile, device: DeviceProfile, tokens: int) -> float:
    """Embedding gather: reads one row per token."""
    return tokens * model.act_bytes_per_token / device.mem_bw


def head_s(model: ModelProfile, device: DeviceProfile, batch: int) -> float:
    """Final norm + LM head for the last position of ``batch`` sequences (the table is read once)."""
    return roofline_s(batch * model.head_flops_per_token, model.head_bytes, device)


# ------------------------------------------------------------------ stages


def stage_decode_s(
    model: ModelProfile,
    device: DeviceProfile,
    span: LayerSpan,
    batch: int = 1,
    context: int = 0,
    calibrated: bool = True,
) -> float:
    """One decode step of a stage: its layers, plus embedding if first and LM head if last."""
    total = sum(layer_decode_s(model, i, device, batch, context, calibrated) for i in span.layers())
    if span.start == 0:
        total += embed_s(model, device, batch)
    if span.end == model.n_layers:
        total += head_s(model, device, batch)
    return total


def stage_prefill_s(
    model: ModelProfile,
    device: DeviceProfile,
    span: LayerSpan,
    batch: int = 1,
    tokens: int = 1,
    calibrated: bool = True,
) -> float:
    """Prefill of ``tokens`` prompt tokens for ``batch`` sequences on one stage."""
    total = sum(layer_prefill_s(model, i, device, batch, tokens, calibrated) for i in span.layers())
    if span.start == 0:
        total += embed_s(model, device, batch * tokens)
    if span.end == model.n_layers:
        total += head_s(model, device, batch)
    return total


# ------------------------------------------------------------------ memory


@dataclass(frozen=True)
class StageMemory:
    """Bytes one stage needs on its device."""

    weights: int  # its layers, plus embedding (first) and norm + LM head (last)
    kv: int  # KV cache reserved for every resident sequence at full context
    activations: int  # forward-pass working set
    headroom: int  # CUDA context, allocator slack

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.activations + self.headroom


def stage_memory(
    model: ModelProfile, span: LayerSpan, kv_tokens: int, act_tokens: int, headroom_bytes: int
) -> StageMemory:
    """Memory of a stage holding ``kv_tokens`` cached tokens (sequences × context) per layer.

    ``act_tokens`` is the number of tokens one forward pass may carry (batch × prompt length).
    """
    weights = sum(model.layer_weight_bytes[i] for i in span.layers())
    if span.start == 0:
        weights += model.embed_bytes
    if span.end == model.n_layers:
        weights += model.head_bytes
    kv = len(span) * kv_tokens * model.kv_bytes_per_token
    act = ACT_WORKSPACE_FACTOR * act_tokens * model.act_bytes_per_token
    return StageMemory(int(weights), int(kv), int(act), int(headroom_bytes))


# ------------------------------------------------------------------ links


@dataclass(frozen=True)
class Links:
    """Network hops between named endpoints ('client' and device names).

    ``between(a, b)`` is the override for a→b if any, else the one for b→a (links are full-duplex,
    so one override serves both directions unless the reverse has its own), else ``default``.
    """

    default: LinkProfile
    hops: tuple[tuple[str, str, LinkProfile], ...] = ()

    def between(self, src: str, dst: str) -> LinkProfile:
        reverse = None
        for a, b, link in self.hops:
            if a == src and b == dst:
                return link
            if a == dst and b == src and reverse is None:
                reverse = link
        return reverse if reverse is not None else self.default

    @staticmethod
    def of(links: Links | LinkProfile) -> Links:
        return links if isinstance(links, Links) else Links(links)


def hop_bytes(model: ModelProfile, tokens: int, src_is_client: bool, dst_is_client: bool) -> int:
    """Payload bytes of one hop carrying ``tokens`` tokens, before the codec."""
    if src_is_client or dst_is_client:
        return tokens * TOKEN_ID_BYTES
    return tokens * model.act_bytes_per_token


def link_serialization_s(link: LinkProfile, nbytes: float, ratio: float = 1.0) -> float:
    """Time the link is busy pushing the payload (the part that queues)."""
    return nbytes * ratio / link.bandwidth


def link_s(link: LinkProfile, nbytes: float, ratio: float = 1.0) -> float:
    """Latency + serialization of one payload."""
    return link.latency_s + link_serialization_s(link, nbytes, ratio)
