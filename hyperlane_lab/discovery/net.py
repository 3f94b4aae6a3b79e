"""Interface choice and address selection shared by the advertiser and the browser.

``interfaces`` is what the user passes (CLI ``--interface``, notebook argument):

* ``"all"``     -- every interface (zeroconf ``InterfaceChoice.All``), the default;
* ``"default"`` -- bind ``0.0.0.0`` and send on the OS default multicast interface;
* an IP, a comma-separated string of IPs, or a list of IPs -- only the interfaces holding those addresses (multi-homed hosts,
  tests on ``127.0.0.1``, network namespaces).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence
from typing import Any

__all__ = ["Interfaces", "choose_address", "local_ipv4_addresses", "make_zeroconf", "to_zeroconf_interfaces"]

log = logging.getLogger(__name__)

Interfaces = str | Sequence[str]


def _check_ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError as exc:
        raise ValueError(
            f"interface {text!r} is neither 'all', 'default' nor an IP address; "
            "pass 'all', 'default' or the IP of a local interface (see `ip -br addr`)"
        ) from exc


def bound_ips(interfaces: Interfaces) -> list[str]:
    """The explicit IPs in ``interfaces`` ([] for 'all'/'default'); a string may list IPs with commas."""
    if isinstance(interfaces, str):
        if interfaces.strip().lower() in ("all", "default"):
            return []
        interfaces = [part for part in interfaces.split(",") if part.strip()]
    ips = [_check_ip(str(ip).strip()) for ip in interfaces]
    if not ips:
        raise ValueError("interfaces is empty; pass 'all', 'default' or at least one local IP")
    return ips


def to_zeroconf_interfaces(interfaces: Interfaces) -> Any:
    """Map our ``interfaces`` argument to zeroconf's ``InterfaceChoice`` or list of IPs."""
    from zeroconf import InterfaceChoice

    if isinstance(interfaces, str) and interfaces.strip().lower() == "all":
        return InterfaceChoice.All
    if isinstance(interfaces, str) and interfaces.strip().lower() == "default":
        return InterfaceChoice.Default
    return bound_ips(interfaces)


def make_zeroconf(interfaces: Interfaces) -> Any:
    """A ``zeroconf.Zeroconf`` that runs its own event-loop thread.

    Never attach to the caller's running loop (Jupyter, grpc.aio): our sync APIs block while waiting,
    and a blocked loop would starve zeroconf. ``use_asyncio=False`` exists in recent zeroconf; for
    older versions build it in a fresh thread, which has no running loop.
    """
    import inspect
    import threading

    from zeroconf import Zeroconf

    zc_interfaces = to_zeroconf_interfaces(interfaces)
    if "use_asyncio" in inspect.signature(Zeroconf).parameters:
        return Zeroconf(interfaces=zc_interfaces, use_asyncio=False)
    box: dict[str, Any] = {}

    def build() -> None:
        try:
            box["zc"] = Zeroconf(interfaces=zc_interfaces)
        except BaseException as exc:  # re-raised in the caller's thread
            box["err"] = exc

    thread = threading.Thread(target=build, name="hyperlane-zeroconf-init", daemon=True)
    thread.start()
    thread.join(timeout=30)
    if "err" in box:
        raise box["err"]
    if "zc" not in box:
        raise RuntimeError("zeroconf did not start within 30 s; check the network interfaces")
    return box["zc"]


def local_ipv4_addresses(include_loopback: bool = False) -> list[str]:
    """IPv4 addresses of this host's interfaces (via ifaddr, a zeroconf dependency)."""
    import ifaddr

    out: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if not isinstance(ip.ip, str):
                continue  # IPv6 entries are tuples
            addr = ipaddress.ip_address(ip.ip)
            if addr.is_loopback and not include_loopback:
                continue
            if ip.ip not in out:
                out.append(ip.ip)
    return out


def choose_address(addresses: Sequence[str], local_ips: Sequence[str] = ()) -> str:
    """Pick the address to reach a worker that announced several (multi-homed host).

    Prefer the IPv4 address sharing the longest prefix with one of ``local_ips`` (the interfaces we
    browse on: same subnet is likely reachable), then any non-loopback IPv4, then anything.
    Returns '' when ``addresses`` is empty.
    """
    if not addresses:
        return ""
    v4 = [a for a in addresses if ipaddress.ip_address(a).version == 4]
    local_v4 = [ipaddress.IPv4Address(ip) for ip in local_ips if ipaddress.ip_address(ip).version == 4]
    if v4 and local_v4:

        def shared_bits(a: str) -> int:
            x = int(ipaddress.IPv4Address(a))
            return max(32 - (x ^ int(loc)).bit_length() for loc in local_v4)

        return max(v4, key=shared_bits)  # max() keeps the first of equal scores (announcement order)
    non_loop = [a for a in v4 if not ipaddress.ip_address(a).is_loopback]
    if non_loop:
        return non_loop[0]
    return v4[0] if v4 else addresses[0]
