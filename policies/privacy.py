"""Privacy helpers: IP truncation for access logs (privacy statement, "Fundamental Data")."""

from __future__ import annotations

import ipaddress


def truncate_ip(ip: str | None, v4_masked_bytes: int = 2, v6_prefix_bits: int = 48) -> str:
    """Mask an address for access logs: ``192.168.17.4`` → ``192.168.x.x``; IPv6 keeps /48.

    Anything that is not an IP address comes back as ``"-"``: a log never carries raw input.
    """
    if not ip:
        return "-"
    try:
        addr = ipaddress.ip_address(ip.strip().split("%", 1)[0])
    except ValueError:
        return "-"
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address):
        keep = 4 - max(0, min(4, v4_masked_bytes))
        parts = str(addr).split(".")
        return ".".join(parts[:keep] + ["x"] * (4 - keep))
    net = ipaddress.ip_network(f"{addr}/{max(0, min(128, v6_prefix_bits))}", strict=False)
    return str(net)
