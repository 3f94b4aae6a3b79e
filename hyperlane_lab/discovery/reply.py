"""WorkerInfo from a gRPC ``InfoReply`` (or any object with the same field names).

The runtime's ``InfoReply`` message names its first fields exactly like ``WorkerInfo``; this copies
them (extra reply fields such as ``versions`` or ``shard`` are ignored), so the worker can advertise
what its Info RPC reports and ``StaticDiscovery``'s fetcher can be ``lambda a: worker_info_from_reply(stub(a).Info(...))``.
No protobuf import: the reply is read by attribute.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from hyperlane_lab.types import WorkerInfo

__all__ = ["worker_info_from_reply"]

_FIELDS = tuple(f.name for f in dataclasses.fields(WorkerInfo))
_REQUIRED = ("worker_id", "host", "grpc_port", "data_port")


def worker_info_from_reply(reply: Any, host: str | None = None) -> WorkerInfo:
    """Copy the ``WorkerInfo`` fields of ``reply``; ``host`` overrides the reply's (the address dialled).

    Fields the reply lacks keep WorkerInfo's defaults, except the four identity fields, whose absence
    raises ``ValueError``. Numeric fields are coerced (protobuf gives int/float already).
    """
    missing = [name for name in _REQUIRED if not hasattr(reply, name)]
    if missing:
        raise ValueError(f"{type(reply).__name__} lacks {missing}; expected an InfoReply-like object")
    values: dict[str, Any] = {name: getattr(reply, name) for name in _FIELDS if hasattr(reply, name)}
    if host:
        values["host"] = host
    for name in ("grpc_port", "data_port", "total_memory", "free_memory", "host_ram", "protocol_version"):
        if name in values:
            values[name] = int(values[name])
    for name in ("flops", "mem_bw"):
        if name in values:
            values[name] = float(values[name])
    for name in ("shard_loaded", "auth_required"):
        if name in values:
            values[name] = bool(values[name])
    return WorkerInfo(**values)
