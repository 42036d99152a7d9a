"""Tell the LAN a node is here: a zeroconf (mDNS/DNS-SD) service of type _caravan._tcp.local.

TXT properties (all short strings): id, name, version (caravan's), protocol, mem (total
bytes), cores, arch, state (idle, loading, ready, failed). The coordinator's discovery reads
them to list nodes without connecting; it still asks each node for its details over gRPC.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

import psutil
from zeroconf import InterfaceChoice, IPVersion, ServiceInfo, Zeroconf

log = logging.getLogger(__name__)

SERVICE_TYPE = "_caravan._tcp.local."


def advertised_addresses(host: str) -> list[str]:
    """The IPv4 addresses to announce: the bound one, or every non-loopback one for 0.0.0.0."""
    if host not in ("", "0.0.0.0"):
        return [host]
    addresses = []
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            if entry.family == socket.AF_INET and not ipaddress.ip_address(entry.address).is_loopback:
                addresses.append(entry.address)
    return addresses or ["127.0.0.1"]


class Advertisement:
    def __init__(self, name: str, host: str, port: int, properties: dict[str, str]):
        self.addresses = advertised_addresses(host)
        # On a bound address announce only on that interface (multi-homed hosts, DESIGN.md).
        interfaces = InterfaceChoice.All if host in ("", "0.0.0.0") else self.addresses
        self.zeroconf = Zeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        self.name, self.port = name, port
        self.properties = dict(properties)
        self.info = self._service_info(f"{name}.{SERVICE_TYPE}")
        self.zeroconf.register_service(self.info, allow_name_change=True)
        log.info("advertising %s on %s port %d", self.info.name, ", ".join(self.addresses), port)

    def _service_info(self, instance: str) -> ServiceInfo:
        return ServiceInfo(
            SERVICE_TYPE,
            instance,
            addresses=[socket.inet_aton(a) for a in self.addresses],
            port=self.port,
            properties=self.properties,
            server=f"{self.name}.local.",
        )

    def update(self, **properties: str) -> None:
        """Announce new TXT values (a ServiceInfo is immutable: send a new one under the same name)."""
        self.properties.update(properties)
        self.info = self._service_info(self.info.name)
        try:
            self.zeroconf.update_service(self.info)
        except Exception as exc:  # noqa: BLE001  (advertising is best effort; serving goes on)
            log.warning("cannot update the zeroconf advertisement: %s", exc)

    def close(self) -> None:
        try:
            self.zeroconf.unregister_service(self.info)
        finally:
            self.zeroconf.close()
