"""Spec-sheet figures of common GPUs, to plan for hardware you do not have (or have not profiled).

``fp16_tflops`` is DENSE (no 2:4 sparsity) fp16/bf16 tensor-core throughput with fp32
accumulation, which is what PyTorch matmuls use. GeForce cards run fp32 accumulation at half their
fp16-accumulate rate, so their figure is half the headline "FP16 tensor" number; workstation and
data-center cards run both at full rate. Memory is the card's nominal size in GiB (GPU "GB" are
binary); the plan's headroom covers the CUDA context and allocator slack.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from hyperlane_lab.types import DeviceProfile

__all__ = ["CATALOG", "CatalogEntry", "catalog_names", "device_from_catalog", "normalize_name"]

GIB = 2**30


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    memory_gib: float
    mem_bw_gbs: float  # GB/s (1e9 B/s)
    fp16_tflops: float  # dense fp16 tensor, fp32 accumulate
    source: str  # the vendor document the figures come from
    note: str = ""

    def to_device(self, name: str | None = None, address: str | None = None) -> DeviceProfile:
        return DeviceProfile(
            name=name or self.name,
            memory_bytes=int(self.memory_gib * GIB),
            flops=self.fp16_tflops * 1e12,
            mem_bw=self.mem_bw_gbs * 1e9,
            address=address,
        )


_AMPERE_GEFORCE = "NVIDIA Ampere GA102 GPU Architecture whitepaper, appendix (GeForce RTX 30 series)"
_ADA = "NVIDIA Ada Lovelace GPU Architecture whitepaper, appendix (GeForce RTX 40 series)"
_E = CatalogEntry

CATALOG: Mapping[str, CatalogEntry] = MappingProxyType(
    {
        e.name: e
        for e in (
            _E("rtx3060", 12, 360, 25.6, _AMPERE_GEFORCE, "12 GB model; 28 SMs"),
            _E("rtx3070", 8, 448, 40.6, _AMPERE_GEFORCE),
            _E("rtx3080", 10, 760, 59.5, _AMPERE_GEFORCE, "10 GB model"),
            _E("rtx3090", 24, 936, 71.0, _AMPERE_GEFORCE),
            _E("rtx4060ti-16gb", 16, 288, 44.1, _ADA, "16 GB model; 34 SMs at 2.535 GHz"),
            _E("rtx4070", 12, 504, 58.3, _ADA),
            _E("rtx4080", 16, 717, 97.5, _ADA),
            _E("rtx4090", 24, 1008, 165.2, _ADA),
            _E(
                "rtx5090",
                32,
                1792,
                209.5,
                "NVIDIA RTX Blackwell GPU Architecture whitepaper (GeForce RTX 5090)",
            ),
            _E(
                "a4000",
                16,
                448,
                76.7,
                "NVIDIA RTX A4000 datasheet",
                "datasheet 153.4 TFLOPS is with sparsity",
            ),
            _E(
                "a5000",
                24,
                768,
                111.1,
                "NVIDIA RTX A5000 datasheet",
                "datasheet 222.2 TFLOPS is with sparsity",
            ),
            _E(
                "a6000",
                48,
                768,
                154.8,
                "NVIDIA RTX A6000 datasheet",
                "datasheet 309.7 TFLOPS is with sparsity",
            ),
            _E(
                "l4",
                24,
                300,
                121.0,
                "NVIDIA L4 Tensor Core GPU datasheet",
                "datasheet 242 TFLOPS is with sparsity",
            ),
            _E("l40s", 48, 864, 362.0, "NVIDIA L40S GPU datasheet"),
            _E("a100-40gb", 40, 1555, 312.0, "NVIDIA A100 Tensor Core GPU datasheet (SXM4 40GB)"),
            _E("a100-80gb", 80, 2039, 312.0, "NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB)"),
            _E("h100-sxm", 80, 3350, 989.0, "NVIDIA H100 Tensor Core GPU datasheet (SXM5)"),
            _E("h100-pcie", 80, 2000, 756.0, "NVIDIA H100 Tensor Core GPU datasheet (PCIe)"),
            _E("h200", 140, 4800, 989.0, "NVIDIA H200 Tensor Core GPU datasheet (SXM)", "141 GB nominal"),
            _E(
                "m2-ultra",
                144,
                800,
                27.2,
                "Apple M2 Ultra press release (June 2023)",
                "192 GB unified memory; macOS lets the GPU use about 75% of it by default",
            ),
        )
    }
)


def normalize_name(name: str) -> str:
    """'RTX 4090' / 'rtx_4090' / 'GeForce RTX 4090' -> 'rtx4090'."""
    key = name.strip().lower().replace("geforce", "").replace("nvidia", "")
    key = key.replace(" ", "").replace("_", "")
    return key.replace("ti16gb", "ti-16gb")


def catalog_names() -> list[str]:
    return sorted(CATALOG)


def lookup(name: str) -> CatalogEntry | None:
    """The entry called ``name`` (normalized), or None."""
    return CATALOG.get(name) or CATALOG.get(normalize_name(name))


def device_from_catalog(
    name: str, device_name: str | None = None, address: str | None = None
) -> DeviceProfile:
    """DeviceProfile of catalog card ``name``; ``device_name`` renames it (e.g. 'rtx3090#2')."""
    entry = lookup(name)
    if entry is None:
        raise ValueError(
            f"unknown catalog device {name!r}; valid names: {', '.join(catalog_names())} "
            "(or give memory_gib, fp16_tflops and mem_bw_gbs explicitly)"
        )
    return entry.to_device(device_name, address)
