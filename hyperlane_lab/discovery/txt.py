"""WorkerInfo <-> mDNS TXT properties for the ``_hyperlane._tcp.local.`` service.

A worker announces one DNS-SD service instance. The SRV record carries the gRPC port, the A/AAAA
records carry the address(es) and the TXT record carries everything else, under short keys (a TXT
record is small: each ``key=value`` entry is at most 255 bytes, and the whole record should fit one
UDP packet):

====  =====================================  ==========================================
key   WorkerInfo field                       format
====  =====================================  ==========================================
v     protocol_version                       decimal int; only SUPPORTED_VERSIONS decode
id    worker_id                              UTF-8 text, non-empty
gp    grpc_port                              decimal int (must equal the SRV port)
dp    data_port                              decimal int
dk    device_kind                            ``[a-z0-9_]+`` e.g. ``cpu``, ``cuda``
dv    device                                 torch device string, e.g. ``cuda:0``
gpu   gpu_name                               UTF-8 text, may be empty
mt    total_memory                           decimal int, bytes
mf    free_memory                            decimal int, bytes (<= mt when mt > 0)
cc    compute_capability                     text, e.g. ``9.0``, may be empty
ram   host_ram                               decimal int, bytes
fl    flops                                  finite float >= 0, FLOP/s (0 = not profiled)
bw    mem_bw                                 finite float >= 0, B/s (0 = not profiled)
sh    shard_loaded                           ``0`` or ``1``
au    auth_required                          ``0`` or ``1``
n     (none: announcement serial)         decimal int, bumped on every update
====  =====================================  ==========================================

``n`` is written by ``WorkerAdvertiser`` and ignored by ``decode_txt``: it makes every update a TXT
record never announced before. Without it, going back to earlier values (free memory A -> B -> A
within a record lifetime) re-sends a record the browsers still hold in cache, which zeroconf treats
as a refresh and reports no update for.

Decoding is strict: a missing key, a value that does not parse, or an unsupported protocol version
raises ``ValueError`` (the browser logs it at DEBUG and ignores that service). Unknown extra keys
are ignored so a newer worker can add fields without breaking older clients. The host is not in
the TXT record; the caller passes the address it resolved from the A/AAAA records.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from hyperlane_lab.types import WorkerInfo

__all__ = [
    "KEYS",
    "PROTOCOL_VERSION",
    "SERIAL_KEY",
    "SERVICE_TYPE",
    "SUPPORTED_VERSIONS",
    "decode_txt",
    "encode_txt",
    "parse_txt_wire",
    "txt_serial",
]

SERVICE_TYPE = "_hyperlane._tcp.local."
SERIAL_KEY = "n"  # announcement serial, see the module docstring
PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
_MAX_ENTRY_BYTES = 255  # RFC 6763 §6.1: one TXT string is a length byte + up to 255 bytes

# key -> WorkerInfo field; the table in the module docstring documents formats.
KEYS: dict[str, str] = {
    "v": "protocol_version",
    "id": "worker_id",
    "gp": "grpc_port",
    "dp": "data_port",
    "dk": "device_kind",
    "dv": "device",
    "gpu": "gpu_name",
    "mt": "total_memory",
    "mf": "free_memory",
    "cc": "compute_capability",
    "ram": "host_ram",
    "fl": "flops",
    "bw": "mem_bw",
    "sh": "shard_loaded",
    "au": "auth_required",
}

# As received (zeroconf: bytes -> bytes | None) or built by hand (str -> str).
TxtProperties = Mapping[bytes, bytes | str | None] | Mapping[str, bytes | str | None]

_INT_RE = re.compile(r"[0-9]{1,20}")
_KIND_RE = re.compile(r"[a-z0-9_]{1,32}")


def _fmt_bool(value: bool) -> str:
    return "1" if value else "0"


def encode_txt(info: WorkerInfo) -> dict[str, str]:
    """TXT properties announcing ``info`` (``info.host`` is carried by the A record, not here).

    Raises ``ValueError`` when a field cannot be announced (negative sizes, non-finite rates,
    an entry longer than 255 bytes).
    """
    for label, value in (
        ("total_memory", info.total_memory),
        ("free_memory", info.free_memory),
        ("host_ram", info.host_ram),
    ):
        if value < 0:
            raise ValueError(f"worker {info.worker_id}: {label} must be >= 0 bytes to advertise, got {value}")
    for label, rate in (("flops", info.flops), ("mem_bw", info.mem_bw)):
        if not (math.isfinite(rate) and rate >= 0):
            raise ValueError(
                f"worker {info.worker_id}: {label} must be finite and >= 0 to advertise, got {rate}"
            )
    if not _KIND_RE.fullmatch(info.device_kind):
        raise ValueError(
            f"worker {info.worker_id}: device_kind {info.device_kind!r} must match [a-z0-9_]+ "
            "(e.g. 'cpu', 'cuda')"
        )
    props = {
        "v": str(int(info.protocol_version)),
        "id": info.worker_id,
        "gp": str(int(info.grpc_port)),
        "dp": str(int(info.data_port)),
        "dk": info.device_kind,
        "dv": info.device,
        "gpu": info.gpu_name,
        "mt": str(int(info.total_memory)),
        "mf": str(int(info.free_memory)),
        "cc": info.compute_capability,
        "ram": str(int(info.host_ram)),
        "fl": repr(float(info.flops)),  # repr round-trips a float exactly
        "bw": repr(float(info.mem_bw)),
        "sh": _fmt_bool(info.shard_loaded),
        "au": _fmt_bool(info.auth_required),
    }
    for key, text in props.items():
        size = len(key.encode()) + 1 + len(text.encode())
        if size > _MAX_ENTRY_BYTES:
            raise ValueError(
                f"worker {info.worker_id}: TXT entry {key!r} ({KEYS[key]}) is {size} bytes, over the "
                f"{_MAX_ENTRY_BYTES}-byte limit; shorten that field"
            )
    return props


def parse_txt_wire(text: bytes) -> dict[bytes, bytes | None]:
    """Split TXT RDATA (length-prefixed strings) into ``{key: value}``; a key without ``=`` maps to None."""
    out: dict[bytes, bytes | None] = {}
    pos = 0
    while pos < len(text):
        length = text[pos]
        entry = text[pos + 1 : pos + 1 + length]
        pos += 1 + length
        key, sep, value = entry.partition(b"=")
        if key and key not in out:
            out[key] = value if sep else None
    return out


def txt_serial(text: bytes) -> int | None:
    """The announcement serial (key ``n``) in TXT RDATA; None when absent or not a decimal int.

    A newer announcement of the same advertiser always carries a larger serial, so this orders TXT
    records of one service that zeroconf's cache holds side by side (see ``records.freshest_txt``).
    """
    raw = _normalise_keys(parse_txt_wire(text)).get(SERIAL_KEY)  # keys are case-insensitive, as in decode_txt
    if not isinstance(raw, bytes) or not raw.isdigit():
        return None
    return int(raw)


def _text(raw: Mapping[str, bytes | str | None], key: str, *, allow_empty: bool = True) -> str:
    if key not in raw:
        raise ValueError(
            f"TXT record lacks key {key!r} ({KEYS[key]}); not a hyperlane worker of this protocol"
        )
    value = raw[key]
    if value is None:
        raise ValueError(f"TXT key {key!r} ({KEYS[key]}) has no value")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"TXT key {key!r} ({KEYS[key]}) is not UTF-8: {value!r}") from exc
    if not allow_empty and not value:
        raise ValueError(f"TXT key {key!r} ({KEYS[key]}) is empty")
    return value


def _int(raw: Mapping[str, bytes | str | None], key: str) -> int:
    text = _text(raw, key)
    if not _INT_RE.fullmatch(text):
        raise ValueError(f"TXT key {key!r} ({KEYS[key]}) must be a non-negative decimal int, got {text!r}")
    return int(text)


def _float(raw: Mapping[str, bytes | str | None], key: str) -> float:
    text = _text(raw, key)
    try:
        value = float(text)
    except ValueError as exc:
        raise ValueError(f"TXT key {key!r} ({KEYS[key]}) must be a float, got {text!r}") from exc
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"TXT key {key!r} ({KEYS[key]}) must be finite and >= 0, got {text!r}")
    return value


def _bool(raw: Mapping[str, bytes | str | None], key: str) -> bool:
    text = _text(raw, key)
    if text not in ("0", "1"):
        raise ValueError(f"TXT key {key!r} ({KEYS[key]}) must be '0' or '1', got {text!r}")
    return text == "1"


def _normalise_keys(properties: TxtProperties) -> dict[str, bytes | str | None]:
    out: dict[str, bytes | str | None] = {}
    for raw_key, value in properties.items():
        if isinstance(raw_key, bytes):
            try:
                key = raw_key.decode("ascii")
            except UnicodeDecodeError:
                continue  # a non-ASCII key cannot be one of ours; ignore it like any unknown key
        else:
            key = raw_key
        out.setdefault(key.lower(), value)  # RFC 6763 §6.4: keys are case-insensitive, first one wins
    return out


def decode_txt(
    properties: TxtProperties,
    host: str,
    srv_port: int | None = None,
) -> WorkerInfo:
    """The WorkerInfo a TXT record announces; ``host`` comes from the service's A/AAAA records.

    ``properties`` may have bytes or str keys/values (zeroconf's ``ServiceInfo.properties`` gives
    bytes). ``srv_port``, when given, must equal the announced gRPC port. Raises ``ValueError``
    saying what was wrong for anything but a complete, well-formed record of a supported version.
    """
    raw = _normalise_keys(properties)
    version = _int(raw, "v")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(
            f"worker announces protocol version {version}, this client supports {sorted(SUPPORTED_VERSIONS)}; "
            "run the same hyperlane_lab version on workers and client"
        )
    worker_id = _text(raw, "id", allow_empty=False)
    grpc_port = _int(raw, "gp")
    if srv_port is not None and srv_port != grpc_port:
        raise ValueError(f"worker {worker_id}: TXT gRPC port {grpc_port} differs from SRV port {srv_port}")
    device_kind = _text(raw, "dk")
    if not _KIND_RE.fullmatch(device_kind):
        raise ValueError(f"worker {worker_id}: device kind {device_kind!r} must match [a-z0-9_]+")
    total, free = _int(raw, "mt"), _int(raw, "mf")
    if total > 0 and free > total:
        raise ValueError(f"worker {worker_id}: free memory {free} exceeds total memory {total}")
    if not host:
        raise ValueError(f"worker {worker_id}: the service has no address")
    return WorkerInfo(  # its __post_init__ rejects bad ports with ValueError
        worker_id=worker_id,
        host=host,
        grpc_port=grpc_port,
        data_port=_int(raw, "dp"),
        device_kind=device_kind,
        gpu_name=_text(raw, "gpu"),
        total_memory=total,
        free_memory=free,
        compute_capability=_text(raw, "cc"),
        host_ram=_int(raw, "ram"),
        flops=_float(raw, "fl"),
        mem_bw=_float(raw, "bw"),
        shard_loaded=_bool(raw, "sh"),
        auth_required=_bool(raw, "au"),
        protocol_version=version,
        device=_text(raw, "dv", allow_empty=False),
    )
