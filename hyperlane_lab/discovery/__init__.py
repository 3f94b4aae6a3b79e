"""Finding workers on the LAN: mDNS advertising/browsing (zeroconf) or a static address list.

zeroconf is imported lazily, inside the methods that use it.
"""

from hyperlane_lab.discovery.advertise import WorkerAdvertiser
from hyperlane_lab.discovery.base import Discovery
from hyperlane_lab.discovery.manager import DiscoveryManager
from hyperlane_lab.discovery.reply import worker_info_from_reply
from hyperlane_lab.discovery.static import StaticDiscovery
from hyperlane_lab.discovery.txt import PROTOCOL_VERSION, SERVICE_TYPE, decode_txt, encode_txt

__all__ = [
    "PROTOCOL_VERSION",
    "SERVICE_TYPE",
    "Discovery",
    "DiscoveryManager",
    "StaticDiscovery",
    "WorkerAdvertiser",
    "decode_txt",
    "encode_txt",
    "worker_info_from_reply",
]
