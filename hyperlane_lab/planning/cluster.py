"""Typed loading of a cluster file (YAML). Unknown keys are rejected with their path.

::

    devices:                      # pipeline order (for the fixed-order partitioners)
      - name: rtx4090             # a catalog name (see planning.catalog) ...
      - name: old-box             # ... or any name with explicit figures
        memory_gib: 12
        fp16_tflops: 25
        mem_bw_gbs: 360           # GB/s
      - name: big
        catalog: a6000            # catalog figures under another name; explicit keys override them
        memory_gib: 40
        address: 10.0.0.7:50051   # optional worker address
        layer_decode_ms: 0.9      # optional measured decode time of one layer (batch 1)
        layer_prefill_ms_per_token: 0.01
    links:                        # every hop client→first→…→last→client
      default: {gbit_s: 1.0, latency_ms: 0.3}
      hops:                       # optional per-hop overrides; one entry serves both directions
        - {from: client, to: rtx4090, gbit_s: 10, latency_ms: 0.05}
    context: 4096                 # tokens of KV cache reserved per sequence
    dtype: fp16                   # fp32 | fp16 | bf16 | int8 (weights and KV)
    headroom_gib: 0.5             # optional, per stage

Repeated device names get suffixes in order (rtx3090, rtx3090#2, …); hops refer to the suffixed
names. Missing ``links`` means 1 Gbit/s and 0.3 ms everywhere; a hop entry without ``gbit_s`` or
``latency_ms`` takes the default's value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from hyperlane_lab.errors import ConfigError
from hyperlane_lab.planning.catalog import catalog_names, lookup
from hyperlane_lab.planning.cost import CLIENT, Links
from hyperlane_lab.types import DeviceProfile, LinkProfile

__all__ = ["DTYPE_BYTES", "Cluster", "cluster_from_dict", "load_cluster"]

GIB = 2**30
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
DEFAULT_LINK = LinkProfile(latency_s=0.3e-3, bandwidth=1.0e9 / 8)

_TOP_KEYS = ("devices", "links", "context", "dtype", "headroom_gib")
_DEVICE_KEYS = (
    "name",
    "catalog",
    "memory_gib",
    "fp16_tflops",
    "mem_bw_gbs",
    "address",
    "layer_decode_ms",
    "layer_prefill_ms_per_token",
)
_LINKS_KEYS = ("default", "hops")
_LINK_KEYS = ("gbit_s", "latency_ms")
_HOP_KEYS = ("from", "to", "gbit_s", "latency_ms")


@dataclass(frozen=True)
class Cluster:
    devices: tuple[DeviceProfile, ...]
    links: Links
    context: int = 4096
    dtype: str = "fp16"
    headroom_bytes: int = 512 * 2**20
    source: str = ""

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


class _Reader:
    """Checks keys and value types, naming the path of anything wrong."""

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, path: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {path}: {message}")

    def mapping(self, value: Any, path: str, keys: tuple[str, ...]) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(
                path, f"expected a mapping with keys {', '.join(keys)}, got {type(value).__name__}"
            )
        for key in value:
            if key not in keys:
                raise self.fail(_join(path, str(key)), f"unknown key; valid keys: {', '.join(keys)}")
        return value

    def number(
        self, m: Mapping[str, Any], key: str, path: str, default: float | None, positive: bool = True
    ) -> float:
        where = _join(path, key)
        if key not in m:
            if default is None:
                raise self.fail(where, "missing")
            return default
        v = m[key]
        ok = not isinstance(v, bool) and isinstance(v, (int, float)) and (v > 0 if positive else v >= 0)
        if not ok:
            raise self.fail(where, f"expected a number {'> 0' if positive else '>= 0'}, got {v!r}")
        return float(v)

    def text(self, m: Mapping[str, Any], key: str, path: str) -> str:
        v = m.get(key)
        if not isinstance(v, str) or not v:
            raise self.fail(_join(path, key), f"expected a non-empty string, got {v!r}")
        return v


def _device(r: _Reader, raw: Any, path: str, name: str) -> DeviceProfile:
    d = r.mapping(raw, path, _DEVICE_KEYS)
    catalog_name = r.text(d, "catalog", path) if "catalog" in d else d["name"]
    entry = lookup(catalog_name)
    if "catalog" in d and entry is None:
        raise r.fail(
            f"{path}.catalog", f"unknown catalog device {catalog_name!r}; valid: {', '.join(catalog_names())}"
        )
    figures = ("memory_gib", "fp16_tflops", "mem_bw_gbs")
    if entry is None and any(f not in d for f in figures):
        lacking = ", ".join(f for f in figures if f not in d)
        raise r.fail(
            path,
            f"{name!r} is not a catalog device and lacks {lacking}; give memory_gib, fp16_tflops and mem_bw_gbs "
            f"or use a catalog name ({', '.join(catalog_names())})",
        )
    mem = r.number(d, "memory_gib", path, entry.memory_gib if entry else None)
    tflops = r.number(d, "fp16_tflops", path, entry.fp16_tflops if entry else None)
    bw = r.number(d, "mem_bw_gbs", path, entry.mem_bw_gbs if entry else None)
    decode_ms = r.number(d, "layer_decode_ms", path, None) if "layer_decode_ms" in d else None
    prefill_ms = (
        r.number(d, "layer_prefill_ms_per_token", path, None) if "layer_prefill_ms_per_token" in d else None
    )
    address = r.text(d, "address", path) if "address" in d else None
    return DeviceProfile(
        name=name,
        memory_bytes=int(mem * GIB),
        flops=tflops * 1e12,
        mem_bw=bw * 1e9,
        layer_decode_s=decode_ms / 1e3 if decode_ms is not None else None,
        layer_prefill_s_per_token=prefill_ms / 1e3 if prefill_ms is not None else None,
        address=address,
    )


def _link(r: _Reader, m: Mapping[str, Any], path: str, default: LinkProfile) -> LinkProfile:
    gbit = r.number(m, "gbit_s", path, default.bandwidth * 8 / 1e9)
    latency_ms = r.number(m, "latency_ms", path, default.latency_s * 1e3, positive=False)
    return LinkProfile(latency_s=latency_ms / 1e3, bandwidth=gbit * 1e9 / 8)


def cluster_from_dict(data: Any, source: str = "<cluster>") -> Cluster:
    """A Cluster from parsed YAML/JSON data; raises ConfigError naming the bad key's path."""
    r = _Reader(source)
    top = r.mapping(data, "", _TOP_KEYS)
    raw_devices = top.get("devices")
    if not isinstance(raw_devices, list) or not raw_devices:
        raise r.fail("devices", "expected a non-empty list of devices")
    devices: list[DeviceProfile] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(raw_devices):
        path = f"devices[{i}]"
        d = r.mapping(raw, path, _DEVICE_KEYS)
        base = r.text(d, "name", path)
        if base == CLIENT:
            raise r.fail(f"{path}.name", f"{CLIENT!r} is reserved for the client; pick another name")
        seen[base] = seen.get(base, 0) + 1
        name = base if seen[base] == 1 else f"{base}#{seen[base]}"
        devices.append(_device(r, d, path, name))

    links_raw = r.mapping(top.get("links", {}), "links", _LINKS_KEYS)
    default = DEFAULT_LINK
    if "default" in links_raw:
        default = _link(
            r, r.mapping(links_raw["default"], "links.default", _LINK_KEYS), "links.default", DEFAULT_LINK
        )
    hops_raw = links_raw.get("hops", [])
    if not isinstance(hops_raw, list):
        raise r.fail("links.hops", "expected a list of {from, to, gbit_s, latency_ms}")
    valid = [CLIENT, *(d.name for d in devices)]
    hops = []
    for i, raw in enumerate(hops_raw):
        path = f"links.hops[{i}]"
        h = r.mapping(raw, path, _HOP_KEYS)
        ends = []
        for key in ("from", "to"):
            end = r.text(h, key, path)
            if end not in valid:
                raise r.fail(f"{path}.{key}", f"unknown endpoint {end!r}; valid: {', '.join(valid)}")
            ends.append(end)
        if ends[0] == ends[1]:
            raise r.fail(path, f"a hop needs two different endpoints, got {ends[0]!r} twice")
        hops.append((ends[0], ends[1], _link(r, h, path, default)))

    context = top.get("context", 4096)
    if isinstance(context, bool) or not isinstance(context, int) or context < 0:
        raise r.fail("context", f"expected an integer >= 0 (tokens), got {context!r}")
    dtype = top.get("dtype", "fp16")
    if dtype not in DTYPE_BYTES:
        raise r.fail("dtype", f"unknown dtype {dtype!r}; valid: {', '.join(DTYPE_BYTES)}")
    headroom = r.number(top, "headroom_gib", "", 0.5, positive=False)
    return Cluster(
        devices=tuple(devices),
        links=Links(default, tuple(hops)),
        context=context,
        dtype=dtype,
        headroom_bytes=int(headroom * GIB),
        source=source,
    )


def load_cluster(path: str | os.PathLike[str]) -> Cluster:
    """Read and validate a cluster YAML file."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read cluster file {path}: {e}; check the path") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    return cluster_from_dict(data, source=str(path))
