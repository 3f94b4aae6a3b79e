"""Tensors <-> frame payloads. Codec 0 (``raw``) sends the tensor as is; other codec ids come from
``hyperlane_lab.codecs`` (int8, int4, ...), which also validates payload lengths."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from hyperlane_lab.errors import ProtocolError
from hyperlane_lab.runtime.frame import FrameHeader, raw_nbytes

__all__ = [
    "RAW",
    "CudaStager",
    "EncodedPayload",
    "check_payload",
    "decode_payload",
    "encode_tensor",
    "tensor_bytes",
]

RAW = 0


@dataclass
class EncodedPayload:
    dtype: torch.dtype  # dtype of the decoded tensor
    codec: int
    group_size: int
    shape: tuple[int, ...]
    parts: list[memoryview]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor."""
    t = t.contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.numel():
        return memoryview(b"")
    arr: Any = t.view(torch.uint8).numpy()  # numpy arrays export the buffer protocol
    return memoryview(arr).cast("B")


def encode_tensor(t: torch.Tensor, codec: str = "raw", group_size: int = 0) -> EncodedPayload:
    if codec in ("raw", "none"):
        return EncodedPayload(t.dtype, RAW, 0, tuple(t.shape), [tensor_bytes(t)])
    from hyperlane_lab import codecs

    c = codecs.get(codec, group_size=group_size or 64)
    enc = c.encode(t)
    return EncodedPayload(t.dtype, c.codec_id, c.group_size, tuple(t.shape), [enc.buffer()])


def _raw_length_ok(h: FrameHeader, n: int) -> int:
    want = raw_nbytes(h.shape, h.dtype)
    if n != want:
        raise ProtocolError(f"payload is {n} bytes but shape {h.shape} of {h.dtype} needs {want}")
    return want


def check_payload(h: FrameHeader, payload: memoryview) -> None:
    """The checks of ``decode_payload`` without decoding (ProtocolError): a GPU worker checks a codec frame's
    host bytes here, then decodes a device copy of them (``decode_payload(..., trusted=True)``)."""
    if h.codec == RAW:
        _raw_length_ok(h, len(payload))
        return
    from hyperlane_lab import codecs

    try:
        codecs.check_frame_payload(h.codec, h.group_size, h.shape, h.dtype, payload)
    except ValueError as e:
        raise ProtocolError(str(e)) from e


def decode_payload(
    h: FrameHeader,
    payload: memoryview | torch.Tensor,
    device: torch.device | str = "cpu",
    trusted: bool = False,
) -> torch.Tensor:
    """Rebuild the tensor of a TENSOR/TOKENS frame; ProtocolError if the length doesn't match.
    ``payload``: the frame body's bytes, or (codec frames) a uint8 tensor of them on any device;
    ``trusted``: they passed ``check_payload`` where they arrived."""
    if h.codec == RAW:
        assert isinstance(payload, memoryview), "raw frames are decoded from their host bytes"
        want = _raw_length_ok(h, len(payload))
        t = (
            torch.frombuffer(payload, dtype=h.dtype).view(h.shape)
            if want
            else torch.empty(h.shape, dtype=h.dtype)
        )
        return t if torch.device(device).type == "cpu" else t.to(device, non_blocking=True)
    from hyperlane_lab import codecs

    try:
        return codecs.decode_frame_payload(h.codec, h.group_size, h.shape, h.dtype, payload, device, trusted)
    except ValueError as e:
        raise ProtocolError(str(e)) from e


class CudaStager:
    """Host <-> device copies for one GPU on their own streams, off the compute stream.

    ``to_device``: CPU tensor -> device on an upload stream (a pageable source is staged by the driver,
    a pinned one is read by DMA; either way the call returns once the source has been read);
    the caller's current (compute) stream waits for it with an event.
    ``to_host``: device tensor -> pinned host tensor on the copy stream once ``after`` (an event on
    the compute stream) has fired; returns the host tensor and an event that fires when it is
    filled. Pinned blocks come from PyTorch's caching host allocator, which keeps a block from
    reuse until the copies that use it have finished, so a payload can stay referenced by the
    socket writer for as long as it needs.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.copy_stream = torch.cuda.Stream(self.device)  # device -> host (waits on compute events)
        # host -> device; waits on compute only for an event it is given (``upload_to``: a graph input's last read)
        self.h2d_stream = torch.cuda.Stream(self.device)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        dev, ready = self.upload(x)
        # the caller may reuse the source once this returns (a pooled frame body): a pinned one
        # is still being read by DMA, so wait for the copy (~0.2 ms for a 4 MB prompt state; a
        # pageable one was staged by the driver already, and this costs nothing more)
        ready.synchronize()
        return dev

    def upload(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        """``to_device`` without the wait: the current stream may use the device tensor at once,
        and the source must stay untouched until the returned event has fired (enqueue the work
        that reads the tensor first, then ``synchronize()`` it before reusing the source)."""
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.h2d_stream):
            dev = torch.empty(x.shape, dtype=x.dtype, device=self.device)  # from the h2d stream's pool
        ready = self._copy_in(x, dev, compute)
        dev.record_stream(compute)  # its memory is not reused before the compute stream is done with it
        return dev, ready

    def upload_into(self, x: torch.Tensor, buf: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event]:
        """``upload`` into ``buf`` (a uint8 device buffer of at least ``x.nbytes``, e.g. from a
        ``staging.StagingPool``) instead of a new allocation: no allocation and no ``record_stream``.
        The caller must not reuse ``buf`` before every reader of the returned tensor is done."""
        dev = buf[: x.nbytes].view(x.dtype).view(x.shape)
        return dev, self._copy_in(x, dev, torch.cuda.current_stream(self.device))

    def upload_to(
        self, x: torch.Tensor, dst: torch.Tensor, after: torch.cuda.Event | None, compute: torch.cuda.Stream
    ) -> tuple[torch.Tensor, torch.cuda.Event]:
        """``upload`` into ``dst``, a device tensor of ``x``'s shape and dtype that others read too (a prompt
        graph's input): the copy starts once ``after`` (the last work that read ``dst``) has fired, and
        ``compute``'s later work sees it. Returns ``dst`` and the event that fires once ``x`` has been read.

        ``after`` should have fired already (``PromptGraphs.input_slot`` gives a slot only then): one that has
        not holds every later upload on this stager's upload stream behind it. The copy runs in inference
        mode: a prompt graph's input is made inside a stage's forward, an inference tensor that may not be
        written outside that mode."""
        with torch.inference_mode():
            return dst, self._copy_in(x, dst, compute, after)

    def _copy_in(
        self,
        x: torch.Tensor,
        dev: torch.Tensor,
        compute: torch.cuda.Stream,
        after: torch.cuda.Event | None = None,
    ) -> torch.cuda.Event:
        """Copy ``x`` into ``dev`` on the upload stream (after ``after``, when given), ordered before
        ``compute``'s later work; the returned event fires once the copy has read ``x``."""
        with torch.cuda.stream(self.h2d_stream):
            if after is not None:
                self.h2d_stream.wait_event(after)
            dev.copy_(x, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.h2d_stream)
        compute.wait_event(ready)
        return ready

    def to_host(self, t: torch.Tensor, after: torch.cuda.Event) -> tuple[torch.Tensor, torch.cuda.Event]:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(after)
            host.copy_(t, non_blocking=True)
            done = torch.cuda.Event(enable_timing=True)
            done.record(self.copy_stream)
        t.record_stream(self.copy_stream)
        return host, done
