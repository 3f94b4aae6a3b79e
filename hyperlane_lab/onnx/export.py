"""Export one pipeline stage to an ONNX file, check it against torch, and cache it.

KV-cache design (the trade-off): ORT cannot safely alias a graph input and output buffer, so a
graph that takes the cache and returns the *updated* cache would copy the whole cache (O(max_len)
per layer per step) into a second buffer. Instead each stage graph reads the cache as an input
(bound in place, never copied) and outputs only the K/V of the S new tokens ``[B, Hkv, S, D]``;
``OrtStage`` scatters those into its cache (a few KB per decode step). Attention inside the graph
runs over ``cache[:max(positions)+1]`` concatenated with the new K/V, masking the cache slots that
this step overwrites, which gives the same (key, value) set as ``TorchStage``'s scatter-then-attend.
The cost: the engine does one extra small scatter per layer outside the graph; the graph's Slice +
Concat copy the used part of the cache once per layer (O(current length), the same order as the
attention read itself, not O(max_len)); and the Slice bound is data-dependent (on CUDA ORT copies
that scalar to the host). A "full cache in, full cache out" graph would avoid the engine scatter
but copy O(max_len) per layer per step, and could not keep a single resident buffer.

dtypes: fp32 and fp16 export and check on CPU; ORT's CPU provider has no bf16 kernels, so a bf16
shard is checked only where the stage lives on CUDA and onnxruntime-gpu is installed (else the
check is skipped with a warning) and runs only with the CUDA provider.

Exporters: ``torchscript`` (``torch.onnx.export(dynamo=False)``) traces the module in well under
a second and records the dynamic Slice directly; ``dynamo`` (``torch.export`` + onnxscript, the
torch default since 2.9) works too (the length goes through ``.item()`` + ``torch._check``) but takes
tens of seconds per stage. ``auto`` uses TorchScript and falls back to dynamo if it is missing or fails.
Files are saved with ``ir_version <= 10`` so onnxruntime(-gpu) 1.18+ can load them.

Cache: ``$HYPERLANE_CACHE/onnx`` (default ``~/.cache/hyperlane_lab/onnx``), keyed by model hash
(sha256 of config + weight files, or of the stage's tensors for a ``TorchStage``/hub id), span,
dtype, opset and graph version. A cached file that fails to parse is exported again.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hyperlane_lab.errors import HyperlaneError
from hyperlane_lab.models.bundled import resolve_model
from hyperlane_lab.models.config import ModelSpec
from hyperlane_lab.models.loading import load_stage, parse_dtype
from hyperlane_lab.models.stage import TorchStage
from hyperlane_lab.onnx.cache import default_cache_dir, model_hash, stage_tensor_hash
from hyperlane_lab.onnx.graph import StageGraph, input_names, output_names
from hyperlane_lab.onnx.parity import parity_device, parity_error
from hyperlane_lab.onnx.shard import GRAPH_VERSION, dtype_name, read_shard_info, spec_to_json
from hyperlane_lab.types import LayerSpan

__all__ = [
    "DEFAULT_OPSET",
    "EXPORTERS",
    "MAX_IR_VERSION",
    "ExportParityError",
    "ExportResult",
    "default_cache_dir",
    "export_stage",
    "model_hash",
    "parity_error",
]

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
MAX_IR_VERSION = 10  # onnxruntime-gpu 1.31 reads IR <= 10 reliably
EXPORTERS = ("auto", "torchscript", "dynamo")
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 8e-2}  # max |onnx - torch| / max(1, max |torch|)
_EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with margin


class ExportParityError(HyperlaneError, RuntimeError):
    """The exported graph disagrees with the torch stage beyond the tolerance."""


@dataclass(frozen=True)
class ExportResult:
    path: Path
    span: LayerSpan
    dtype: str
    opset: int
    exporter: str  # torchscript | dynamo | cache
    model_hash: str
    sha256: str  # of the .onnx file
    size_bytes: int  # .onnx file plus its external data file, if any
    export_s: float  # 0 on a cache hit
    cached: bool
    max_abs_err: float | None  # vs TorchStage on random prefill + decode (None: not checked / cache hit)
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


# ---------------------------------------------------------------------- export


def _example_inputs(stage: TorchStage) -> tuple[torch.Tensor, ...]:
    # Sizes > 1 and distinct, so no dimension gets specialised during tracing.
    b, s, t = 2, 4, 9
    s_ = stage.spec
    g = torch.Generator().manual_seed(0)
    dev = stage.device
    if stage.is_first:
        x = torch.randint(0, s_.vocab_size, (b, s), generator=g).to(dev)
    else:
        x = torch.randn(b, s, s_.hidden_size, generator=g).to(device=dev, dtype=stage.dtype)
    positions = torch.arange(s).repeat(b, 1).to(dev)
    extra = [torch.tensor([[s - 1, 0], [s - 1, 1]], device=dev)] if stage.is_last else []
    past = [
        torch.zeros(b, s_.n_kv_heads, t, s_.head_dim, dtype=stage.dtype, device=dev)
        for _ in range(2 * len(stage.span))
    ]
    return (x, positions, *extra, *past)


def _run_exporter(stage: TorchStage, dest: Path, opset: int, exporter: str) -> None:
    names_in = input_names(stage.span.layers(), stage.is_first, stage.is_last)
    names_out = output_names(stage.span.layers(), stage.is_last)
    args = _example_inputs(stage)
    if exporter == "torchscript":
        graph = StageGraph(stage, symbolic_len="tensor").eval()
        axes: dict[str, dict[int, str]] = {"x": {0: "batch", 1: "seq"}, "positions": {0: "batch", 1: "seq"}}
        if stage.is_last:
            axes["logits_index"] = {0: "batch", 1: "n_logits"}
            axes["logits"] = {0: "batch", 1: "n_logits"}
        else:
            axes["hidden"] = {0: "batch", 1: "seq"}
        for n in names_in[len(names_in) - 2 * len(stage.span) :]:
            axes[n] = {0: "batch", 2: "cache_len"}
        for n in names_out[1:]:
            axes[n] = {0: "batch", 2: "seq"}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph,
                args,
                str(dest),
                dynamo=False,
                input_names=names_in,
                output_names=names_out,
                dynamic_axes=axes,
                opset_version=opset,
                do_constant_folding=True,
            )
        return
    from torch.export import Dim

    graph = StageGraph(stage, symbolic_len="item").eval()
    batch, seq = Dim("batch", min=1, max=1 << 16), Dim("seq", min=1, max=1 << 20)
    cache_len = Dim("cache_len", min=2, max=1 << 24)
    # forward(x, positions, *rest): dynamic_shapes mirrors that structure, rest as one tuple
    rest: list[Any] = [{0: batch, 1: Dim("n_logits", min=1, max=1 << 20)}] if stage.is_last else []
    rest += [{0: batch, 2: cache_len} for _ in range(2 * len(stage.span))]
    shapes = ({0: batch, 1: seq}, {0: batch, 1: seq}, tuple(rest))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph,
            args,
            dynamo=True,
            input_names=names_in,
            output_names=names_out,
            dynamic_shapes=shapes,
            opset_version=opset,
            verbose=False,
        )
    assert program is not None
    program.save(str(dest))


def _finalize(tmp_model: Path, dest: Path, metadata: dict[str, str]) -> None:
    """Cap the IR version, attach hyperlane metadata, write ``dest`` atomically."""
    import onnx

    model = onnx.load(str(tmp_model))  # also reads external data the exporter may have written
    model.ir_version = min(int(model.ir_version), MAX_IR_VERSION)
    del model.metadata_props[:]
    for k, v in metadata.items():
        model.metadata_props.add(key=k, value=v)
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
    if weight_bytes > _EXTERNAL_DATA_BYTES:
        onnx.save_model(
            model,
            str(tmp),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=dest.name + ".data",
            size_threshold=1024,
        )
    else:
        onnx.save_model(model, str(tmp))
    os.replace(tmp, dest)


def export_stage(
    model: Any,
    span: LayerSpan | tuple[int, int] | None = None,
    path: str | os.PathLike[str] | None = None,
    dtype: str | torch.dtype | None = None,
    opset: int = DEFAULT_OPSET,
    spec: ModelSpec | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    use_cache: bool = True,
    exporter: str = "auto",
    validate: bool = True,
) -> ExportResult:
    """Export layers ``span`` of ``model`` (HF folder, GGUF, hub id, None = bundled, or a ``TorchStage``)
    to one ONNX file; return where it is and how it checked out.

    ``dtype`` defaults to fp32 (or the stage's own dtype for a ``TorchStage``). With ``path`` the
    file is copied there from the cache; without, the cached file is returned. ``validate`` runs
    ``parity_error`` after a fresh export and raises ``ExportParityError`` above ``TOLERANCE``.
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; valid: {', '.join(EXPORTERS)}")
    span = LayerSpan(*span) if isinstance(span, tuple) else span
    stage: TorchStage | None = None
    if isinstance(model, TorchStage):
        stage = model
        if span is not None and span != stage.span:
            raise ValueError(
                f"span {span} was asked but the given TorchStage holds {stage.span}; pass span=None"
            )
        span = stage.span
        if dtype is not None and parse_dtype(dtype) != stage.dtype:
            raise ValueError(f"the given TorchStage is {stage.dtype}; build it in {dtype} or pass dtype=None")
        torch_dtype = stage.dtype
        mhash = stage_tensor_hash(stage)
        source_name = stage.spec.name or "TorchStage"
    else:
        if span is None:
            raise ValueError("export_stage needs a layer span, e.g. span=(0, 2)")
        torch_dtype = parse_dtype(dtype or "fp32")
        source = resolve_model(model)
        source_name = str(model) if model is not None else "bundled"
        file_hash = model_hash(source, cache_dir)
        if file_hash is None:  # hub id: weights are fetched per span, so hash what was fetched
            stage = load_stage(source, span, torch_dtype, "cpu", spec)
            file_hash = stage_tensor_hash(stage)
        mhash = file_hash
    dname = dtype_name(torch_dtype)
    key = f"{mhash[:16]}_L{span.start}-{span.end}_{dname}_op{opset}_g{GRAPH_VERSION}"
    cache_root = default_cache_dir(cache_dir)
    target = (
        cache_root / f"{key}.onnx" if use_cache else Path(tempfile.mkdtemp(prefix="hl-onnx-")) / f"{key}.onnx"
    )

    if use_cache and target.exists():
        try:
            info = read_shard_info(target)
            if info.model_hash == mhash and info.span == span:
                log.info("ONNX export cache hit: %s", target)
                return _result(target, path, span, dname, opset, "cache", mhash, 0.0, True, None)
            log.warning("cached ONNX %s has other metadata; exporting again", target)
        except ValueError as e:
            log.warning("cached ONNX %s is unreadable (%s); exporting again", target, e)
        target.unlink(missing_ok=True)

    if stage is None:
        stage = load_stage(resolve_model(model), span, torch_dtype, "cpu", spec)
    metadata = {
        "hyperlane.format": "hyperlane-stage",
        "hyperlane.span": f"{span.start},{span.end}",
        "hyperlane.spec": spec_to_json(stage.spec),
        "hyperlane.dtype": dname,
        "hyperlane.model_hash": mhash,
        "hyperlane.graph_version": str(GRAPH_VERSION),
        "hyperlane.source": source_name,
    }
    t0 = time.perf_counter()
    used = _export_to(stage, target, opset, exporter, metadata)
    export_s = time.perf_counter() - t0
    err = None
    check_on = parity_device(stage, dname) if validate else None
    if validate and check_on is None:
        log.warning("stage %s: onnxruntime's CPU provider has no %s kernels; export not checked", span, dname)
    if check_on is not None:
        try:
            err, rel = parity_error(stage, target, device=check_on)
        except BaseException:  # never leave an unchecked file where the cache would find it
            target.unlink(missing_ok=True)
            raise
        tol = TOLERANCE[dname]
        if not rel <= tol:
            target.unlink(missing_ok=True)
            raise ExportParityError(
                f"ONNX export of stage {span} ({dname}, {used}) differs from torch by {err:.3g} ({rel:.3g} relative), "
                f"over the tolerance {tol}; try exporter='dynamo'/'torchscript' or another opset"
            )
    log.info("exported stage %s of %s to %s in %.2fs (err %s)", span, source_name, target, export_s, err)
    return _result(target, path, span, dname, opset, used, mhash, export_s, False, err)


def _export_to(stage: TorchStage, target: Path, opset: int, exporter: str, metadata: dict[str, str]) -> str:
    order = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
    last_error: Exception | None = None
    for name in order:
        with tempfile.TemporaryDirectory(prefix="hl-onnx-") as tmp:
            raw = Path(tmp) / "stage.onnx"
            try:
                # the dynamo exporter prints graphs to stdout; keep them out of the caller's output
                with contextlib.redirect_stdout(io.StringIO()) as noise:
                    _run_exporter(stage, raw, opset, name)
                if noise.getvalue():
                    log.debug("%s exporter output:\n%s", name, noise.getvalue())
            except Exception as e:  # exporters raise many types; try the next one
                last_error = e
                log.warning("%s ONNX export of stage %s failed: %s", name, stage.span, e)
                continue
            _finalize(raw, target, metadata)
            return name
    raise ExportParityError(
        f"could not export stage {stage.span} with {' or '.join(order)}: {last_error}; "
        "check that onnx/onnxscript match your torch version"
    ) from last_error


def _result(
    target: Path,
    path: str | os.PathLike[str] | None,
    span: LayerSpan,
    dname: str,
    opset: int,
    exporter: str,
    mhash: str,
    export_s: float,
    cached: bool,
    err: float | None,
) -> ExportResult:
    info = read_shard_info(target)
    data = target.with_name(target.name + ".data")
    out = target
    if path is not None:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(target, out)
        if data.exists():
            shutil.copyfile(data, out.with_name(target.name + ".data"))
    size = info.size_bytes + (data.stat().st_size if data.exists() else 0)
    return ExportResult(
        path=out,
        span=span,
        dtype=dname,
        opset=info.opset or opset,
        exporter=exporter,
        model_hash=mhash,
        sha256=info.sha256,
        size_bytes=size,
        export_s=export_s,
        cached=cached,
        max_abs_err=err,
        input_names=tuple(n for n, _, _ in info.inputs),
        output_names=tuple(n for n, _, _ in info.outputs),
    )
