"""Find caravan nodes on the LAN: browse _caravan._tcp.local. for a moment, then resolve each."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from zeroconf import IPVersion, ServiceBrowser, ServiceListener, Zeroconf

log = logging.getLogger(__name__)

SERVICE_TYPE = "_caravan._tcp.local."
DISCOVER_SECONDS = 2.0  # mDNS answers arrive within a second on a quiet LAN


@dataclass(frozen=True)
class Advert:
    name: str  # the node's name (the service instance without the service type)
    address: str  # host:port to connect to
    properties: dict[str, str]


class _Collector(ServiceListener):
    def __init__(self):
        self.names: set[str] = set()
        self.lock = threading.Lock()

    def add_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        with self.lock:
            self.names.add(name)

    def update_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        self.add_service(zc, type_, name)

    def remove_service(self, zc: Zeroconf, type_: str, name: str) -> None:
        with self.lock:
            self.names.discard(name)


def discover(seconds: float = DISCOVER_SECONDS) -> list[Advert]:
    """Nodes that answer within `seconds`, sorted by name."""
    zc = Zeroconf(ip_version=IPVersion.V4Only)
    try:
        collector = _Collector()
        browser = ServiceBrowser(zc, SERVICE_TYPE, collector)
        time.sleep(seconds)
        browser.cancel()
        with collector.lock:
            names = sorted(collector.names)
        adverts = []
        for instance in names:
            info = zc.get_service_info(SERVICE_TYPE, instance, timeout=1000)
            if info is None or not info.parsed_addresses() or not info.port:
                log.info("cannot resolve %s; skipping it", instance)
                continue
            props = {k.decode(errors="replace"): (v or b"").decode(errors="replace")
                     for k, v in info.properties.items()}
            name = instance[: -len(SERVICE_TYPE) - 1] if instance.endswith("." + SERVICE_TYPE) else instance
            adverts.append(Advert(name, f"{info.parsed_addresses()[0]}:{info.port}", props))
        return adverts
    finally:
        zc.close()
