"""``hyperlane export [MODEL] --stages N --out DIR``: one ONNX file per stage plus ``manifest.json``."""

from __future__ import annotations

import argparse

from hyperlane_lab.cli.common import format_table, print_json

__all__ = ["add_parser", "parse_spans", "run"]


def parse_spans(text: str) -> list[tuple[int, int]]:
    """``"0:2,2:4,4:5"`` -> [(0, 2), (2, 4), (4, 5)]."""
    spans = []
    for part in text.split(","):
        try:
            a, b = part.split(":")
            spans.append((int(a), int(b)))
        except ValueError:
            raise ValueError(
                f"bad span {part!r} in --spans; write spans as start:end,start:end (e.g. 0:2,2:5)"
            ) from None
    return spans


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("export", help="export a model's stages to ONNX files for the onnxruntime engine")
    p.add_argument(
        "model", nargs="?", default=None, help="HF folder, .gguf file or hub id (default: bundled)"
    )
    p.add_argument("--stages", type=int, default=1, help="split into N uniform stages (default 1)")
    p.add_argument("--spans", default=None, help="explicit spans instead of --stages, e.g. 0:2,2:5")
    p.add_argument("--out", required=True, help="output folder (shards + manifest.json)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    p.add_argument("--exporter", default="auto", choices=["auto", "torchscript", "dynamo"])
    p.add_argument("--no-validate", action="store_true", help="skip the onnx-vs-torch check after export")
    p.add_argument("--cache-dir", default=None, help="export cache (default $HYPERLANE_CACHE/onnx)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hyperlane_lab.onnx.export import DEFAULT_OPSET
    from hyperlane_lab.onnx.manifest import MANIFEST_NAME, export_shards
    from hyperlane_lab.types import LayerSpan

    spans = [LayerSpan(a, b) for a, b in parse_spans(args.spans)] if getattr(args, "spans", None) else None
    manifest = export_shards(
        args.model,
        args.out,
        n_stages=args.stages,
        spans=spans,
        dtype=args.dtype,
        opset=args.opset or DEFAULT_OPSET,
        exporter=getattr(args, "exporter", "auto"),
        validate=not getattr(args, "no_validate", False),
        cache_dir=getattr(args, "cache_dir", None),
    )
    if getattr(args, "json", False):
        print_json(manifest)
        return 0
    rows = [
        {
            "stage": st["index"],
            "span": f"[{st['span'][0]}, {st['span'][1]})",
            "file": st["file"],
            "MB": round(st["size_bytes"] / 1e6, 3),
            "export_s": st["export_s"],
            "max_abs_err": "-" if st["max_abs_err"] is None else f"{st['max_abs_err']:.2e}",
            "sha256": st["sha256"][:12],
        }
        for st in manifest["stages"]
    ]
    print(format_table(rows))
    print(
        f"\nwrote {len(rows)} shard(s) and {args.out}/{MANIFEST_NAME} ({manifest['dtype']}, opset {manifest['opset']})"
    )
    return 0
