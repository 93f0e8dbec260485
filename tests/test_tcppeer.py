"""Who is at the other end of a local TCP connection (:mod:`imsd.tcppeer`): the table lookup
table-tested, then against this machine's own tables over real loopback sockets (a second
real user: tests/test_attacks.py)."""

from __future__ import annotations

import os
import socket
import sys
import time

import pytest
from imsd import tcppeer
from imsd.config import ProxySpec
from imsd.tcppeer import owner, proc_address

HEADER = (
    b"  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
    b"timeout inode\n"
)


def _line(n: int, local: bytes, remote: bytes, st: str, uid: int, inode: int) -> bytes:
    return (
        f"{n:4}: {local.decode()} {remote.decode()} {st} 00000000:00000000 00:00000000 "
        f"00000000 {uid:5} 0 {inode} 1 0000000000000000 20 4 30 10 -1\n"
    ).encode()


CLIENT = proc_address("127.0.0.1", 40000)
PROXY = proc_address("127.0.0.1", 8080)
OTHER = proc_address("127.0.0.1", 40001)


@pytest.mark.parametrize(
    ("lines", "uid"),
    [
        # The client's socket: local = our peer, remote = us.
        ([_line(0, CLIENT, PROXY, "01", 1234, 555)], 1234),
        # Our own accepted socket (the daemon's uid) is the reverse: never taken for the peer.
        ([_line(0, PROXY, CLIENT, "01", 999, 556)], None),
        ([_line(0, PROXY, CLIENT, "01", 999, 556), _line(1, CLIENT, PROXY, "01", 1234, 555)], 1234),
        # The listener, another connection of the same client: not this one.
        (
            [
                _line(0, proc_address("0.0.0.0", 8080), proc_address("0.0.0.0", 0), "0A", 0, 9),
                _line(1, OTHER, PROXY, "01", 0, 557),
            ],
            None,
        ),
        # An orphan (closed by its process; the kernel says uid 0 for it) names nobody.
        ([_line(0, CLIENT, PROXY, "04", 0, 0)], None),
        # A half-closed client still owns its socket.
        ([_line(0, CLIENT, PROXY, "05", 1234, 555)], 1234),
        # Not there at all: a peer on another host, or gone.
        ([], None),
    ],
)
def test_owner_is_the_client_sockets_uid(lines: list[bytes], uid: int | None) -> None:
    assert owner(HEADER + b"".join(lines), CLIENT, PROXY) == uid


def test_a_truncated_line_names_nobody() -> None:
    assert owner(HEADER + b"   0: " + CLIENT + b" " + PROXY + b" 01", CLIENT, PROXY) is None


@pytest.mark.skipif(sys.byteorder != "little", reason="the table's words are in native order")
@pytest.mark.parametrize(
    ("ip", "port", "text"),
    [
        ("127.0.0.1", 8080, b"0100007F:1F90"),
        ("10.1.2.3", 1, b"0302010A:0001"),
        ("::1", 443, b"00000000000000000000000001000000:01BB"),
        ("::ffff:127.0.0.1", 80, b"0000000000000000FFFF00000100007F:0050"),
    ],
)
def test_proc_address_is_printed_as_the_kernel_does(ip: str, port: int, text: bytes) -> None:
    assert proc_address(ip, port) == text


@pytest.mark.skipif(tcppeer.available() is not None, reason="no /proc/self/net/tcp here")
@pytest.mark.parametrize(
    ("family", "bind", "connect"),
    [
        (socket.AF_INET, "127.0.0.1", "127.0.0.1"),
        (socket.AF_INET6, "::1", "::1"),
        (socket.AF_INET6, "::", "127.0.0.1"),  # dual stack: an IPv4 client seen v4-mapped
    ],
)
def test_a_real_loopback_peer_is_this_process_user(family: int, bind: str, connect: str) -> None:
    with socket.socket(family) as srv:
        if family == socket.AF_INET6:
            srv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        srv.bind((bind, 0))
        srv.listen()
        client = socket.create_connection((connect, srv.getsockname()[1]))
        accepted, _ = srv.accept()
        with accepted:
            peer, ours = accepted.getpeername()[:2], accepted.getsockname()[:2]
            cred = tcppeer._lookup(peer, ours)
            assert cred is not None
            assert cred.uid == os.getuid()
            assert cred.gid == os.getgid()
            client.close()  # now an orphan, then gone: nobody
            deadline = time.monotonic() + 5
            while tcppeer._lookup(peer, ours) is not None:
                assert time.monotonic() < deadline
                time.sleep(0.01)  # the kernel's table, polled under a deadline


@pytest.mark.parametrize(
    ("table", "checks"),
    [
        ({"listen": "127.0.0.1:8080"}, True),  # on by default for TCP
        ({"listen": "127.0.0.1:8080", "peer_check": False}, False),
        ({"listen": "0.0.0.0:8080", "allow_remote": True}, False),  # remote clients: no user
        ({"listen": "0.0.0.0:8080", "allow_remote": True, "peer_check": True}, True),
        ({"listen": "/run/imsd/aep.sock"}, True),
        ({"listen": "/run/imsd/aep.sock", "peer_check": False}, True),  # SO_PEERCRED, always
    ],
)
def test_which_listeners_check_their_peers(table: dict[str, object], checks: bool) -> None:
    spec = ProxySpec(credential="aep", product="aep-dev", **table)
    assert spec.checks_peers is checks
