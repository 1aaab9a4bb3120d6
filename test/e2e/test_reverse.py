"""Reverse tunnels: the host listens (TCP or a Unix socket) and the peer dials a service inside the VM.
The same pump and the same promises as forward tunnels: every byte both ways, half-close, many
connections at once; a peer that is gone closes each client at once, and the tunnel serves again
when it is back. Over the tcp: and unix: transports, in one `local` process, over real vsock, and
from the host of a Firecracker-style VM through a stand-in VMM (hybrid: test_hybrid.py)."""

import os
import socket
import threading

import pytest
from test_failure_matrix import VSOCK_GUEST

from helpers import (
    MODES,
    exchange,
    half_close_server,
    how_it_ended,
    reply_for,
    sha256,
    socket_dir,
    source_server,
    stream_bytes,
    unix_echo_server,
    unix_exchange,
    wait_until,
)

ALL_TRANSPORTS = [*MODES, "hybrid", pytest.param("vsock", marks=[pytest.mark.vsock, VSOCK_GUEST]),
                  pytest.param("hybrid-vsock", marks=[pytest.mark.vsock, VSOCK_GUEST])]
MiB = 1024 * 1024


def host_port(entry):
    return int(entry["host-listen-address"].rsplit(":", 1)[1])


@pytest.mark.parametrize("mode", ALL_TRANSPORTS)
def test_reverse_tunnels_carry_every_byte_both_ways_beside_a_forward_one(deployment, echo, mode):
    """TCP and Unix-socket listeners on the host, TCP and Unix-socket upstreams in the VM, and a forward
    tunnel in the same config: 32 MiB echoed through each reverse tunnel, SHA-256 both ways."""
    sockets = socket_dir()
    vm_echo = unix_echo_server(f"{sockets}/vm-echo.sock")
    d = deployment(mode)
    to_tcp = d.add_reverse("to-tcp", f"127.0.0.1:{echo.port}")
    d.add_reverse("to-unix", f"unix://{sockets}/vm-echo.sock", f"unix://{sockets}/host.sock",
                  **{"host-socket-mode": "0660"})
    forward = d.add_tunnel("forward", echo.port)
    d.start()
    d.wait_ready()
    payload = os.urandom(32 * MiB)
    assert sha256(exchange(host_port(to_tcp), payload)) == sha256(payload)
    assert (len(payload), sha256(payload)) in echo.received  # what the upstream got, byte for byte
    assert sha256(unix_exchange(f"{sockets}/host.sock", payload)) == sha256(payload)
    assert (len(payload), sha256(payload)) in vm_echo.received
    assert oct(os.stat(f"{sockets}/host.sock").st_mode & 0o777) == "0o660"
    assert exchange(forward["peer-port"], b"forward") == b"forward"
    vm_echo.stop()


@pytest.mark.parametrize("mode", ALL_TRANSPORTS)
def test_fifty_reverse_connections_at_once(deployment, echo, mode):
    d = deployment(mode)
    entry = d.add_reverse("many", f"127.0.0.1:{echo.port}")
    d.start()
    d.wait_ready()
    payloads = [os.urandom(size) for size in ([1, 4096, 65536, 1 * MiB] * 13)[:50]]
    results = {}

    def one(i):
        try:
            results[i] = exchange(host_port(entry), payloads[i])
        except OSError as exc:
            results[i] = exc
    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [sha256(results[i]) if isinstance(results[i], bytes) else results[i] for i in range(50)] == \
        [sha256(p) for p in payloads]


@pytest.mark.parametrize("mode", [*MODES, "hybrid"])
def test_half_close_travels_both_ways(deployment, mode):
    """The client half-closes first (the upstream answers after its end of stream), and the
    upstream ends first (a download, then the client's end)."""
    answers, download = half_close_server(), source_server(3 * MiB)
    d = deployment(mode)
    ask = d.add_reverse("ask", f"127.0.0.1:{answers.port}")
    get = d.add_reverse("get", f"127.0.0.1:{download.port}")
    d.start()
    d.wait_ready()
    request = os.urandom(2 * MiB)
    assert exchange(host_port(ask), request) == reply_for(len(request), sha256(request))
    with socket.create_connection(("127.0.0.1", host_port(get)), timeout=60) as sock:
        what, received = how_it_ended(sock)
    assert what == "eof" and received == b"".join(stream_bytes(3 * MiB))
    answers.stop()
    download.stop()


@pytest.mark.parametrize("mode", ["tcp", "unix", "hybrid"])
def test_a_client_meets_a_closed_connection_at_once_while_the_peer_is_gone_and_is_served_when_it_is_back(
        deployment, echo, mode):
    d = deployment(mode)
    entry = d.add_reverse("rev", f"127.0.0.1:{echo.port}")
    d.start()
    d.wait_ready()
    assert exchange(host_port(entry), b"before") == b"before"
    d.peer.stop()
    try:  # at once: the host cannot reach the peer (the reset may come before connect returns)
        with socket.create_connection(("127.0.0.1", host_port(entry)), timeout=10) as sock:
            sock.settimeout(10)
            ended = how_it_ended(sock)
    except ConnectionResetError:
        ended = ("reset", None)
    assert ended == ("reset", None)
    d.host.wait_for_log("peer unreachable")
    d.start_peer()
    wait_until(lambda: _echoes(host_port(entry)), timeout=30, what="the tunnel to serve again")


def _echoes(port):
    try:
        return exchange(port, b"again", timeout=5) == b"again"
    except OSError:
        return False
