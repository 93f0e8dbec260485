"""Who is at the other end of a local TCP connection (Linux): the user owning the client's
socket, as the kernel lists it in ``/proc/self/net/tcp`` and ``tcp6`` (this network
namespace's sockets; ``/proc/self/net`` stays visible under systemd's ``ProcSubset=pid``).

The client's socket is the line whose local address is our peer's and whose remote address is
ours; its ``uid`` column is the owner of the socket's inode (who created it). A line with
inode 0 is an orphan (the client closed it; the kernel reports uid 0 for it): it names
nobody, and neither does a 4-tuple missing from the table (a peer on another host, or gone).
The peer's groups come from the user database, as ``login`` would give them (a TCP socket
carries no credentials of its process, unlike ``SO_PEERCRED``).

:func:`owner` is pure (the table's bytes in, a uid out); :func:`tcp_peer` does the reads.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import anyio
import anyio.abc
from anyio.abc import SocketAttribute

from imsd.httpserver import PeerCred

__all__ = ["TABLES", "available", "owner", "proc_address", "tcp_peer"]

#: The kernel's tables of this network namespace's TCP sockets, per address family.
TABLES: Final = {4: Path("/proc/self/net/tcp"), 6: Path("/proc/self/net/tcp6")}
_UID_COLUMN: Final = 7
_INODE_COLUMN: Final = 9


def proc_address(ip: str, port: int) -> bytes:
    """``ip:port`` as the tables print it: each 32-bit word of the address in the kernel's
    (native) byte order, in hex, then the port."""
    addr = ipaddress.ip_address(ip)
    if addr.version == 4:
        words = struct.unpack("=I", addr.packed)
    else:
        words = struct.unpack("=4I", addr.packed)
    return ("".join(f"{w:08X}" for w in words) + f":{port:04X}").encode()


def owner(table: bytes, local: bytes, remote: bytes) -> int | None:
    """The uid owning the socket whose addresses are *local* and *remote* (as
    :func:`proc_address` gives them) in a ``/proc/net/tcp`` table; None if it is not there
    or is an orphan."""
    needle = b" " + local + b" " + remote + b" "
    at = table.find(needle)
    while at >= 0:
        end = table.find(b"\n", at)
        line = table[table.rfind(b"\n", 0, at) + 1 : end if end >= 0 else len(table)]
        fields = line.split()
        try:
            uid, inode = int(fields[_UID_COLUMN]), int(fields[_INODE_COLUMN])
        except (IndexError, ValueError):
            return None
        if fields[1] == local and fields[2] == remote and inode != 0:
            return uid
        at = table.find(needle, at + 1)
    return None


def _candidates(
    peer: str, peer_port: int, ours: str, our_port: int
) -> Iterator[tuple[int, bytes, bytes]]:
    """(table, local, remote) to look for: the client's socket may be IPv4 while ours is an
    IPv6 socket seeing it v4-mapped (a dual-stack listener), or IPv6 itself."""
    p, o = ipaddress.ip_address(peer), ipaddress.ip_address(ours)
    if isinstance(p, ipaddress.IPv6Address) and isinstance(o, ipaddress.IPv6Address):
        yield 6, proc_address(peer, peer_port), proc_address(ours, our_port)
        pm, om = p.ipv4_mapped, o.ipv4_mapped
        if pm is not None and om is not None:
            yield 4, proc_address(str(pm), peer_port), proc_address(str(om), our_port)
    elif p.version == 4 and o.version == 4:
        yield 4, proc_address(peer, peer_port), proc_address(ours, our_port)


def available() -> str | None:
    """Why peers cannot be looked up here, or None when they can."""
    try:
        with open(TABLES[4], "rb") as f:
            f.read(1)
    except OSError as e:
        return f"{TABLES[4]}: {os.strerror(e.errno) if e.errno else e} (Linux only)"
    return None


def _lookup(peer: tuple[str, int], ours: tuple[str, int]) -> PeerCred | None:
    try:
        candidates = list(_candidates(peer[0], peer[1], ours[0], ours[1]))
    except ValueError:  # not an IP address: not a TCP peer
        return None
    for version, local, remote in candidates:
        try:
            table = TABLES[version].read_bytes()
        except OSError:
            continue
        uid = owner(table, local, remote)
        if uid is not None:
            return _cred(uid)
    return None


def _cred(uid: int) -> PeerCred:
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:  # no such user in the database: the uid alone
        return PeerCred(0, uid, -1, ())
    try:
        groups = tuple(os.getgrouplist(pw.pw_name, pw.pw_gid))
    except OSError:
        groups = ()
    return PeerCred(0, uid, pw.pw_gid, groups)


async def tcp_peer(stream: anyio.abc.ByteStream) -> PeerCred | None:
    """The user at the other end of *stream* (a TCP connection accepted here) with the groups
    the user database gives them (pid 0: unknown); None if no local socket owns it. The
    reads and the user database lookup run in a worker thread."""
    sock: socket.socket | None = stream.extra(SocketAttribute.raw_socket, None)
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        peer, ours = sock.getpeername()[:2], sock.getsockname()[:2]
    except OSError:
        return None
    return await anyio.to_thread.run_sync(_lookup, peer, ours)
