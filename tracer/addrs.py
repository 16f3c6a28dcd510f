"""Addresses of both families, one way everywhere.

The event record carries every address in 16 bytes (an IPv4 address in the first 4, the
rest zero; the event's flags say which family each group of addresses is). Decoded frames
hold each address twice: a numeric *key* column (`saddr`, …: uint64) that groups, joins and
compares fast, and a string column (`saddr_str`, …: categorical) for people.

The key of an IPv4 address is its 32-bit value (what frames always held, so IPv4 code and
old trace files keep their numbers); the key of an IPv6 address has the top bit set and 63
bits of a hash of its 16 bytes (distinct from every IPv4 key; a collision between two IPv6
addresses of one trace would need ~2^31 of them). Anything that compares a frame's address
column with an address it knows by name uses `key()`.
"""

from __future__ import annotations

import hashlib
import ipaddress

V6_BIT = 1 << 63
_MASK63 = (1 << 63) - 1

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def family(addr: str) -> int:
    """4 or 6 for an address string ("" and anything unparsable: ValueError)."""
    return ipaddress.ip_address(addr).version


def key_of_packed(packed: bytes, v6: bool) -> int:
    """The key of an address given as the record holds it (16 bytes, or 4 for IPv4)."""
    if not v6:
        return int.from_bytes(bytes(packed[:4]), "big")
    h = hashlib.blake2b(bytes(packed[:16]), digest_size=8).digest()
    return V6_BIT | (int.from_bytes(h, "big") & _MASK63)


def key(addr: str | IPAddress | None) -> int:
    """The frame key of an address ("" / None: 0, as an absent address in a frame)."""
    if not addr:
        return 0
    a = addr if not isinstance(addr, str) else ipaddress.ip_address(addr)
    if a.version == 4:
        return int(a)
    return key_of_packed(a.packed, True)


def text_of_packed(packed: bytes, v6: bool) -> str:
    """The address as people write it ("" for an all-zero address)."""
    raw = bytes(packed[:16] if v6 else packed[:4])
    if not any(raw):
        return ""
    return str(ipaddress.IPv6Address(raw) if v6 else ipaddress.IPv4Address(raw))


def packed16(addr: str) -> bytes:
    """An address in the record's 16-byte form (IPv4 in the first 4 bytes)."""
    a = ipaddress.ip_address(addr)
    return a.packed if a.version == 6 else a.packed + bytes(12)


def is_v6_key(k: int) -> bool:
    return bool(k & V6_BIT)


def sort_key(addr: str) -> tuple[int, int]:
    """Orders addresses IPv4 first, then IPv6, each numerically."""
    a = ipaddress.ip_address(addr)
    return a.version, int(a)
