"""Real AF_VSOCK: the code a WSL or KVM user runs, run inside a throwaway VM guest.

`tox -e vsock` boots the guest with test/vsockvm.sh, which marks its kernel command line with
vsockvm_guest=1. Anywhere else these tests skip before touching AF_VSOCK: on a machine that is
itself a VM guest without vsock loopback, a vsock connect would reach the hypervisor.
"""

import os
import socket
import threading
import urllib.request
from pathlib import Path

import pytest

from helpers import (
    HttpServer,
    echo_server,
    echo_works,
    exchange,
    exchange_on,
    half_close_server,
    reply_for,
    sha256,
    socket_dir,
    wait_until,
)


def in_vsock_guest():
    try:
        return "vsockvm_guest=1" in Path("/proc/cmdline").read_text().split()
    except OSError:
        return False


pytestmark = [pytest.mark.vsock,
              pytest.mark.skipif(not in_vsock_guest(), reason="real AF_VSOCK runs only inside the "
                                 "throwaway guest of test/vsockvm.sh (tox -e vsock)")]


@pytest.fixture(scope="module")
def upstreams():
    servers = {"web": HttpServer(b"<h1>over vsock</h1>" * 1000), "echo": echo_server(),
               "half": half_close_server()}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def tunnel(upstreams, tmp_path_factory):
    from conftest import Deployment
    d = Deployment("vsock", tmp_path_factory.mktemp("vsock"))
    entries = {name: d.add_tunnel(name, server.port) for name, server in upstreams.items()}
    d.peer_socket = f"{socket_dir()}/peer.sock"
    entries["sock"] = d.add_tunnel("sock", upstreams["echo"].port, peer_socket=d.peer_socket)
    d.start()
    d.entries = entries
    yield d
    d.stop()


def port(tunnel, name):
    return tunnel.entries[name]["peer-port"]


def test_handshake_over_vsock(tunnel):
    tunnel.host.wait_for_log("handshake with the peer at vsock:1 port", timeout=60)
    assert "over vsock" in tunnel.peer.log and "over vsock:1" in tunnel.host.log


def test_http_request(tunnel):
    def fetch():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port(tunnel, 'web')}/", timeout=10) as r:
                return r.read()
        except OSError:
            return None
    assert wait_until(fetch, timeout=60, what="the page over vsock") == b"<h1>over vsock</h1>" * 1000


def test_echo_checksums_on_concurrent_connections(tunnel, upstreams):
    wait_until(lambda: echo_works(port(tunnel, "echo")), timeout=60, what="an echo over vsock")
    payloads = [os.urandom(n) for n in (1, 4096, 300_000, 1_000_000)]
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, exchange(port(tunnel, "echo"),
                                                                                    payloads[i])))
               for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i, sent in enumerate(payloads):
        assert sha256(results[i]) == sha256(sent)
        assert (len(sent), sha256(sent)) in upstreams["echo"].received


def test_half_close_travels_through_vsock(tunnel):
    request = os.urandom(100_000)
    reply = exchange(port(tunnel, "half"), request)
    assert reply == reply_for(len(request), sha256(request))


def test_peer_socket_over_vsock(tunnel, upstreams):
    payload = os.urandom(500_000)
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(60)
        client.connect(tunnel.peer_socket)
        assert sha256(exchange_on(client, payload)) == sha256(payload)
    assert (len(payload), sha256(payload)) in upstreams["echo"].received


def test_host_restarted_while_the_peer_runs(tunnel):
    assert tunnel.host.kill() == -9
    wait_until(lambda: not echo_works(port(tunnel, "echo")), timeout=30, what="the tunnel to be down")
    tunnel.peer.wait_for_log("host unreachable")
    assert tunnel.peer.alive()
    tunnel.start_host()
    wait_until(lambda: echo_works(port(tunnel, "echo"), 50_000), timeout=90, what="the tunnel to serve again")


def test_legs_from_a_cid_that_is_not_the_other_ends_are_refused(tmp_path):
    """Each end admits legs only from the other end's CID. The guest has one CID, so the foreign one is
    presented honestly: an end told to expect CID 2 while its legs come over vsock_loopback, whose
    getpeername says CID 1. Forward: a host started with --vsock vsock:2. Reverse: a peer on its
    default transport (the host's CID, 2). Nothing is dialled for a refused leg."""
    from helpers import Vtunnel, _next_vsock_port, echo_server, free_port, how_it_ended, tunnel_entry, write_config
    upstream = echo_server()
    forward = tunnel_entry("fwd", upstream.port, "vsock")
    reverse = {"name": "rev", "handshake-port": _next_vsock_port(), "vsock-peer-port": _next_vsock_port(),
               "host-listen-address": f"127.0.0.1:{free_port()}", "upstream-server-address":
               f"127.0.0.1:{upstream.port}"}
    config = write_config(tmp_path, [forward, reverse])
    peer = Vtunnel("peer", "--config-path", config, log_dir=tmp_path)  # expects the host at CID 2
    host = Vtunnel("host", "--config-path", config, "--vsock", "vsock:2", log_dir=tmp_path)  # expects the peer at 2
    try:
        host.wait_for_log("fwd: listening on", timeout=60)
        host.wait_for_log("rev: listening on", timeout=60)
        for port in (forward["peer-port"], int(reverse["host-listen-address"].rsplit(":", 1)[1])):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(b"anyone?")
                assert how_it_ended(sock)[0] in ("reset", "eof")
        host.wait_for_log("fwd: refused a leg from 1: a leg from CID 1, not from CID 2: the peer is not there")
        peer.wait_for_log("rev: refused a leg from 1: a leg from CID 1, not from CID 2: the host is not there")
        assert upstream.accepted == 0, "the upstream was never dialled"
    finally:
        print(f"--- peer:\n{peer.log}\n--- host:\n{host.log}")
        peer.stop()
        host.stop()
        upstream.stop()
