"""Reading a service's current TXT record out of zeroconf's cache.

Why not ``ServiceInfo.properties`` (or ``cache.get_by_details``): when a worker re-announces a
changed TXT record with the cache-flush bit set, zeroconf follows RFC 6762 §10.2 and keeps the
previous record one more second, restamped in place with ``created = now`` and ``ttl = 1``. The new
record arrives in the same packet, so it carries the very same ``created``; for that second both
are live, and a lookup returns whichever was cached first: the OLD one. ``ServiceBrowser`` fires
its single ``Updated`` event exactly in that second, and nothing fires when the old copy expires,
so a browser that reads "the first" or "the newest by ``created``" record keeps the stale values
until the next change. (A record received less than a second before the update is not restamped,
keeps its older ``created`` and loses, which is why quick in-process tests saw updates while a real
worker, re-announcing seconds after it was discovered, did not.)

The fix: our advertiser puts a serial (TXT key ``n``) in every announcement, larger each time; the
live record with the largest serial is the current one. Records without a serial (a foreign or
older advertiser) rank below those with one, and among themselves by ``created`` and then ``ttl``
(the restamped copy has ``ttl = 1``, the new one its full TTL).
"""

from __future__ import annotations

from typing import Any

from hyperlane_lab.discovery.txt import txt_serial

__all__ = ["DNS_CLASS_IN", "DNS_TYPE_SRV", "DNS_TYPE_TXT", "freshest_txt", "live_records", "txt_rank"]

DNS_TYPE_TXT, DNS_TYPE_SRV, DNS_CLASS_IN = 16, 33, 1  # RFC 1035/2782 record types TXT, SRV; class IN


def live_records(cache: Any, name: str, rtype: int, now: float | None = None) -> list[Any]:
    """The unexpired records of ``name`` and type ``rtype`` (class IN) in a zeroconf ``DNSCache``."""
    from zeroconf import current_time_millis

    now = current_time_millis() if now is None else now
    return [r for r in cache.get_all_by_details(name, rtype, DNS_CLASS_IN) if not r.is_expired(now)]


def txt_rank(record: Any) -> tuple[int, float, int]:
    """Sort key of a cached ``DNSText``: (serial or -1, created ms, ttl s); larger is newer."""
    serial = txt_serial(bytes(record.text))
    return (-1 if serial is None else serial, float(record.created), int(record.ttl))


def freshest_txt(cache: Any, name: str, now: float | None = None) -> bytes | None:
    """TXT RDATA of the current announcement of service ``name`` (None when no live TXT is cached)."""
    records = live_records(cache, name, DNS_TYPE_TXT, now)
    if not records:
        return None
    return bytes(max(records, key=txt_rank).text)
