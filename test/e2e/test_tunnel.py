"""End to end: real vtunnel processes, real upstream servers, checksums both ways."""

import hashlib
import os
import random
import socket
import threading
import time
import urllib.request

import pytest

from helpers import (
    MODES,
    HttpServer,
    echo_server,
    echo_works,
    exchange,
    half_close_server,
    reply_for,
    sha256,
    wait_until,
)


def started(deployment, mode, echo):
    d = deployment(mode)
    entry = d.add_tunnel("echo", echo.port)
    d.start()
    d.wait_ready()
    wait_until(lambda: echo_works(entry["peer-port"]), what="the tunnel to carry a round trip")
    return d, entry


@pytest.mark.parametrize("mode", MODES)
def test_http_client_gets_the_page(deployment, mode):
    body = os.urandom(300_000)
    upstream = HttpServer(body)
    try:
        d = deployment(mode)
        entry = d.add_tunnel("web", upstream.port)
        d.start()

        def fetch():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{entry['peer-port']}/", timeout=5) as r:
                    return r.read()
            except OSError:
                return None
        page = wait_until(fetch, what="the page through the tunnel")
        assert sha256(page) == sha256(body)
    finally:
        upstream.stop()


@pytest.mark.parametrize("mode", [*MODES, "hybrid"])
def test_32_mib_each_way_arrives_intact(deployment, echo, mode):
    d, entry = started(deployment, mode, echo)
    payload = os.urandom(32 * 1024 * 1024)
    echoed = exchange(entry["peer-port"], payload)
    assert len(echoed) == len(payload)
    assert sha256(echoed) == sha256(payload)  # upstream -> client intact
    assert (len(payload), sha256(payload)) in echo.received  # client -> upstream intact


@pytest.mark.parametrize("mode", ["tcp", "unix", "hybrid"])
def test_50_concurrent_connections_each_intact(deployment, echo, mode):
    d, entry = started(deployment, mode, echo)
    rng = random.Random(50)
    payloads = [os.urandom(rng.choice([0, 1, 64, 65536, 300_000, 1_000_000])) for _ in range(50)]
    results = [None] * len(payloads)

    def run(i):
        results[i] = exchange(entry["peer-port"], payloads[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(payloads))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for sent, got in zip(payloads, results, strict=True):
        assert got is not None and sha256(got) == sha256(sent)
    received = list(echo.received)
    for sent in payloads:
        assert (len(sent), sha256(sent)) in received


@pytest.mark.parametrize("mode", [*MODES, "hybrid"])
def test_half_close_client_gets_the_whole_reply(deployment, mode):
    upstream = half_close_server()
    try:
        d = deployment(mode)
        entry = d.add_tunnel("halfclose", upstream.port)
        d.start()
        request = os.urandom(200_000)
        expected = reply_for(len(request), sha256(request))

        def attempt():
            try:
                return exchange(entry["peer-port"], request, timeout=10)
            except OSError:
                return None
        reply = wait_until(attempt, what="a reply through the tunnel")
        assert len(reply) == len(expected) and reply == expected
    finally:
        upstream.stop()


@pytest.mark.parametrize("mode", ["tcp", "unix"])
def test_two_tunnels_reach_their_own_upstreams(deployment, mode):
    first, second = echo_server(), half_close_server()
    try:
        d = deployment(mode)
        a = d.add_tunnel("first", first.port)
        b = d.add_tunnel("second", second.port)
        d.start()
        d.wait_ready()
        wait_until(lambda: echo_works(a["peer-port"]), what="tunnel 'first'")
        payload = os.urandom(4096)
        assert exchange(a["peer-port"], payload) == payload
        assert exchange(b["peer-port"], payload) == reply_for(len(payload), sha256(payload))
        assert (len(payload), sha256(payload)) in first.received
        assert (len(payload), sha256(payload)) in second.received
    finally:
        first.stop()
        second.stop()


@pytest.mark.parametrize("order", ["peer-first", "host-first"])
def test_either_end_may_start_first(deployment, echo, order):
    d = deployment("tcp")
    entry = d.add_tunnel("echo", echo.port)
    if order == "peer-first":
        d.start_peer().wait_for_log("answering handshakes")
        time.sleep(1)
        d.start_host()
    else:
        host = d.start_host()
        host.wait_for_log("retrying in")
        time.sleep(1.5)
        assert host.alive()
        d.start_peer()
    d.host.wait_for_log("handshake with the peer")
    wait_until(lambda: echo_works(entry["peer-port"]), what="a round trip")


def test_peer_survives_the_host_going_away(deployment, echo):
    d, entry = started(deployment, "tcp", echo)
    assert d.host.kill() == -9
    # With the host gone, a client is closed promptly and the peer says why.
    start = time.monotonic()
    try:  # the reset may even beat connect() back to the client
        with socket.create_connection(("127.0.0.1", entry["peer-port"]), timeout=10) as client:
            assert client.recv(1) == b""
    except ConnectionResetError:
        pass
    assert time.monotonic() - start < 5
    d.peer.wait_for_log("host unreachable")
    assert d.peer.alive()
    d.start_host()
    wait_until(lambda: echo_works(entry["peer-port"], 100_000), what="the tunnel to serve again")


def test_sigterm_exits_zero_and_logs_the_stop(deployment, echo):
    d, entry = started(deployment, "tcp", echo)
    assert d.stop() == [0, 0]
    assert "SIGTERM" in d.peer.log and "stopped" in d.host.log
    assert "Traceback" not in d.logs()


def test_connection_log_counts_bytes_each_way(deployment, echo):
    d, entry = started(deployment, "tcp", echo)
    payload = os.urandom(12345)
    assert exchange(entry["peer-port"], payload) == payload
    d.host.wait_for_log("12345 bytes to upstream, 12345 bytes back")
    d.peer.wait_for_log("12345 bytes to host, 12345 bytes back")
    assert hashlib.sha256(payload).hexdigest() not in d.logs()
