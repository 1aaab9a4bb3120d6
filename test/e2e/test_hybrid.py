"""The host of a Firecracker or Cloud Hypervisor VM: `--vsock hybrid:PATH`, through a stand-in VMM written
from the published protocol (test/hybrid_vmm.py). Outside the QEMU guest the peer is on Unix sockets
(`unix:`), inside it on real AF_VSOCK, so the VMM sits between a Unix socket and the kernel's vsock as
Firecracker does. The reverse tunnels, half-close and the failure matrix through the VMM are in
test_reverse.py, test_tunnel.py and test_failure_matrix.py (mode "hybrid")."""

import os
import socket
import threading
import time

import pytest
from test_failure_matrix import VSOCK_GUEST

from helpers import echo_works, exchange, sha256, socket_dir, wait_until
from vtunnel import HybridTransport

HYBRID = ["hybrid", pytest.param("hybrid-vsock", marks=[pytest.mark.vsock, VSOCK_GUEST])]
MiB = 1024 * 1024


@pytest.mark.parametrize("mode", HYBRID)
def test_the_host_finds_the_peer_through_the_vmm_and_carries_every_byte(deployment, echo, mode):
    d = deployment(mode)
    entry = d.add_tunnel("fc", echo.port)
    d.start()
    d.wait_ready()
    d.host.wait_for_log(f"fc: handshake with the peer at hybrid:{d.vmm_dir}/vmm.sock port "
                        f"{entry['handshake-port']} succeeded")
    assert d.vmm.connects[0] == entry["handshake-port"]  # the handshake went through the VMM's CONNECT
    assert os.stat(f"{d.vmm_dir}/vmm.sock_{entry['vsock-host-port']}").st_mode & 0o777 == 0o600
    wait_until(lambda: echo_works(entry["peer-port"]), what="a round trip through the VMM")
    payload = os.urandom(32 * MiB)
    assert sha256(exchange(entry["peer-port"], payload)) == sha256(payload)
    assert (len(payload), sha256(payload)) in echo.received
    d.stop()
    assert not os.path.exists(f"{d.vmm_dir}/vmm.sock_{entry['vsock-host-port']}")  # removed at stop


@pytest.mark.parametrize("answer, problem", [
    ("refuse", "the VMM closed the connection after CONNECT {port}: nothing listens on vsock port {port} in "
               "the guest"),
    ("silent", "the VMM at {vmm} did not answer CONNECT {port} within 5s"),
])
def test_a_vmm_that_refuses_or_never_answers_is_a_failed_handshake_that_says_so(deployment, echo, answer, problem):
    d = deployment("hybrid")
    d.vmm_answer = answer
    entry = d.add_tunnel("fc", echo.port)
    d.start()
    said = problem.format(port=entry["handshake-port"], vmm=f"{d.vmm_dir}/vmm.sock")
    d.host.wait_for_log(f"fc: handshake attempt 1 with hybrid:{d.vmm_dir}/vmm.sock port "
                        f"{entry['handshake-port']}: {said}; retrying")
    d.host.wait_for_log("handshake attempt 2")  # it keeps trying, and serves nothing meanwhile
    assert "fc: listening on" not in d.host.log and d.host.alive()


def _fake_vmm(path, answer, then=b""):
    """A VMM that answers one CONNECT with `answer` and `then` in one write, and records the line."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)
    heard = []

    def serve():
        conn, _ = listener.accept()
        line = b""
        while not line.endswith(b"\n"):
            line += conn.recv(1)
        heard.append(line)
        conn.sendall(answer + then)
        time.sleep(1)
        conn.close()
        listener.close()
    threading.Thread(target=serve, daemon=True).start()
    return heard


def test_the_guest_bytes_that_follow_the_answer_in_the_same_read_are_kept():
    """The VMM's `OK` and the guest's first bytes may arrive in one segment: none of them is lost."""
    path = f"{socket_dir()}/vmm.sock"
    heard = _fake_vmm(path, b"OK 1073741824\n", b"SSH-2.0-guest\r\n")
    sock = HybridTransport(path).connect(52, timeout=5)
    sock.settimeout(5)
    assert heard == [b"CONNECT 52\n"]
    assert sock.recv(100) == b"SSH-2.0-guest\r\n"
    sock.close()


def test_an_answer_that_is_not_ok_is_a_refusal_that_quotes_it():
    path = f"{socket_dir()}/vmm.sock"
    _fake_vmm(path, b"ERROR no such port\n")
    with pytest.raises(ConnectionRefusedError, match="the VMM answered 'ERROR no such port' to CONNECT 7"):
        HybridTransport(path).connect(7, timeout=5)
