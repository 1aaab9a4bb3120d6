"""Faults: every case checks what the client sees, then that the tunnel is still healthy.

Healthy means: a fresh connection round-trips with a checksum, no connection is counted open,
and no greenlet or file descriptor is left behind (both counted by the processes themselves,
on SIGUSR1).
"""

import contextlib
import os
import re
import socket
import threading
import time

import pytest

from helpers import (
    Vtunnel,
    echo_server,
    echo_works,
    exchange,
    exchange_partly,
    free_port,
    reset,
    sha256,
    socket_dir,
    source_server,
    stream_bytes,
    tunnel_entry,
    wait_until,
    write_config,
)


class Faulty:
    """A deployment with a 'probe' tunnel to a healthy echo server beside the tunnels under test."""

    def __init__(self, deployment, mode="tcp"):
        self.probe_upstream = echo_server()
        self.upstreams = [self.probe_upstream]
        self.d = deployment(mode)
        self.probe = self.d.add_tunnel("probe", self.probe_upstream.port)

    def add(self, name, **keys):
        return self.d.add_tunnel(name, **keys)

    def add_echo(self, name, **keys):
        """A tunnel to an echo upstream of its own, stopped with the deployment."""
        upstream = echo_server()
        self.upstreams.append(upstream)
        return self.add(name, upstream_port=upstream.port, **keys)

    def start(self):
        self.d.start()
        self.d.wait_ready()
        wait_until(lambda: echo_works(self.probe["peer-port"]), what="the probe tunnel")
        self.baseline = {p: wait_for_quiet(p) for p in self.d.processes()}
        return self

    def assert_healthy(self):
        payload = os.urandom(256 * 1024)
        assert sha256(exchange(self.probe["peer-port"], payload)) == sha256(payload)
        for process, before in self.baseline.items():
            assert process.alive()
            after = wait_for_quiet(process, before)
            assert after["greenlets"] <= before["greenlets"] and after["fds"] <= before["fds"], (before, after)

    def stop(self):
        for upstream in self.upstreams:
            upstream.stop()


def wait_for_quiet(process, limit=None):
    """Wait until no connection is open (and counts are back to `limit`); return the process counts."""
    last = {}

    def quiet_and_remembered():
        last["snapshot"] = process.snapshot()
        return quiet_from(last["snapshot"])

    def quiet_from(snap):
        opened = sum(v["open"] for k, v in snap.items() if k != "process")
        counts = snap["process"]
        back = limit is None or (counts["greenlets"] <= limit["greenlets"] and counts["fds"] <= limit["fds"])
        return counts if opened == 0 and back else None
    try:
        return wait_until(quiet_and_remembered, timeout=30, interval=0.2, what=f"{process.args[0]} to be quiet")
    except AssertionError:
        raise AssertionError(f"{process.args[0]} not quiet: {last.get('snapshot')}, limit {limit}") from None


@pytest.fixture(params=["tcp", "unix"])
def faulty(deployment, request):
    """Faulty deployments over each transport the tests reach: TCP legs, and Unix-socket legs (which,
    like AF_VSOCK, carry no reset of their own)."""
    made = []

    def make():
        made.append(Faulty(deployment, request.param))
        return made[-1]
    yield make
    for f in made:
        f.stop()


def ended(sock):
    """True once the connection is over, by end of stream or reset; raises socket.timeout if not."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def closed_promptly(port, payload=b"hello", within=5.0):
    """Connect, send, read to the end, which must come within `within` s; how the client saw it:
    'eof' or 'reset'."""
    start = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=within) as sock:
            sock.sendall(payload)
            while sock.recv(65536):
                pass
            outcome = "eof"
    except ConnectionResetError:
        outcome = "reset"
    except BrokenPipeError:
        outcome = "reset"
    assert time.monotonic() - start < within
    return outcome


# ---------------------------------------------------------------- upstream faults

def test_upstream_refuses_then_comes_back(faulty):
    f = faulty()
    port = free_port()  # nobody listens here yet
    entry = f.add("down", upstream_port=port)
    f.start()
    assert closed_promptly(entry["peer-port"]) == "reset"  # a failure, not an end of stream
    f.d.host.wait_for_log("upstream unreachable: connection refused")
    f.assert_healthy()
    late = echo_server(port)
    try:
        wait_until(lambda: echo_works(entry["peer-port"], 100_000), what="the upstream to be reached")
    finally:
        late.stop()


class ResetAfter(threading.Thread):
    """An upstream that reads `after` bytes, then resets the connection."""

    def __init__(self, after):
        super().__init__(daemon=True)
        self.after = after
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.start()

    def run(self):
        conn, _ = self.listener.accept()
        got = 0
        while got < self.after:
            got += len(conn.recv(65536))
        reset(conn)


def test_upstream_resets_mid_stream_reaches_the_client_as_a_reset(faulty):
    f = faulty()
    upstream = ResetAfter(1_000_000)
    entry = f.add("reset", upstream_port=upstream.port)
    f.start()
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        exchange(entry["peer-port"], os.urandom(16 * 1024 * 1024), timeout=20)
    # The upstream's reset meets whichever direction touches it first: its read (reset by peer) or, while
    # the upload is still being written, its write (broken pipe; seen once in CI, over gevent 23.9).
    wait_until(lambda: re.search(r"failed \(upstream: (connection reset by peer|broken pipe)\)", f.d.host.log),
               what="the host's close line naming the upstream")
    f.assert_healthy()


def test_upstream_that_never_accepts_times_out_at_connect_timeout(faulty):
    f = faulty()
    stuck = socket.socket()
    stuck.bind(("127.0.0.1", 0))
    stuck.listen(0)
    fillers = []
    for _ in range(8):  # fill the accept queue; later SYNs are dropped, connects hang
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(stuck.getsockname())
        fillers.append(filler)
    try:
        entry = f.add("stuck", upstream_port=stuck.getsockname()[1], **{"connect-timeout": 1})
        f.start()
        start = time.monotonic()
        closed_promptly(entry["peer-port"], within=10)
        assert 0.8 < time.monotonic() - start < 5
        f.d.host.wait_for_log("upstream unreachable: timed out")
        f.assert_healthy()
    finally:
        for sock in fillers + [stuck]:
            sock.close()


def test_upstream_that_closes_without_reading(faulty):
    f = faulty()
    rude = socket.create_server(("127.0.0.1", 0))

    def serve():
        for _ in range(2):
            conn, _ = rude.accept()
            conn.close()
    threading.Thread(target=serve, daemon=True).start()
    entry = f.add("rude", upstream_port=rude.getsockname()[1])
    f.start()
    for _ in range(2):  # its FIN may arrive (and be passed on) before its reset for the unread bytes
        closed_promptly(entry["peer-port"], os.urandom(1_000_000), within=10)
    f.assert_healthy()
    rude.close()


# ---------------------------------------------------------------- process faults

def big_echo_in_background(port, size):
    """Start a large echo exchange; returns (thread, result dict with what was sent and what came back)."""
    result = {"sent": os.urandom(size), "got": b""}

    def run():
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            result["got"], _ = exchange_partly(sock, result["sent"])
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


@pytest.mark.parametrize("victim", ["host", "peer"])
def test_end_killed_mid_transfer_then_restarted(faulty, victim):
    f = faulty()
    entry = f.add_echo("echo")
    f.start()
    survivor = f.d.peer if victim == "host" else f.d.host
    thread, result = big_echo_in_background(entry["peer-port"], 400 * 1024 * 1024)
    wait_until(lambda: survivor.snapshot()["echo (peer)" if survivor is f.d.peer else "echo (host)"]["open"],
               what="the transfer to start")
    time.sleep(0.3)
    getattr(f.d, victim).kill()
    thread.join(30)
    assert not thread.is_alive(), "the client must not hang when an end dies"
    got = result["got"]
    assert len(got) < len(result["sent"]) and got == result["sent"][: len(got)], \
        "what arrived is an exact prefix of what was sent: nothing corrupted or reordered"
    assert survivor.alive()
    f.baseline = {survivor: f.baseline[survivor]}
    (f.d.start_host if victim == "host" else f.d.start_peer)()
    wait_until(lambda: echo_works(entry["peer-port"], 100_000), what="the tunnel to serve again")
    f.assert_healthy()


# ---------------------------------------------------------------- client faults

def test_client_resets_mid_transfer(faulty):
    f = faulty()
    entry = f.add_echo("echo")
    f.start()
    for _ in range(5):
        sock = socket.create_connection(("127.0.0.1", entry["peer-port"]))
        sock.sendall(os.urandom(2_000_000))
        sock.recv(1000)
        reset(sock)
    f.d.peer.wait_for_log("failed (client: connection reset by peer)")
    f.assert_healthy()


def test_client_that_never_reads_stalls_the_upstream_with_bounded_memory(faulty):
    f = faulty()
    size = 256 * 1024 * 1024
    source = source_server(size)
    entry = f.add("download", upstream_port=source.port)
    f.start()
    before = {p: p.rss_kib() for p in f.d.processes()}
    with socket.create_connection(("127.0.0.1", entry["peer-port"]), timeout=60) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        time.sleep(3)  # the client reads nothing; the upstream keeps trying to send 256 MiB
        stalled = {p: p.rss_kib() for p in f.d.processes()}
        for process in f.d.processes():
            grown = stalled[process] - before[process]
            print(f"{process.args[0]}: RSS {before[process]} KiB -> {stalled[process]} KiB while stalled")
            assert grown < 16 * 1024, f"{process.args[0]} grew {grown} KiB while the client did not read"
        received = b"".join(iter(lambda: sock.recv(1 << 20), b""))
    assert len(received) == size and sha256(received) == sha256(b"".join(stream_bytes(size)))
    f.assert_healthy()
    source.stop()


def test_thousands_of_connections_opened_and_abandoned(faulty):
    f = faulty()
    entry = f.add_echo("echo")
    f.start()
    for batch in range(6):
        socks = [socket.create_connection(("127.0.0.1", entry["peer-port"])) for _ in range(400)]
        if batch % 2:
            for sock in socks[::2]:
                sock.sendall(b"half-said")
        for sock in socks:
            sock.close()
    f.assert_healthy()
    snap = f.d.peer.snapshot()["echo (peer)"]
    assert snap["total"] == 2400 and snap["open"] == 0


def test_descriptor_exhaustion_then_recovery(tmp_path):
    echo = echo_server()
    sockets = socket_dir()
    entry = tunnel_entry("echo", echo.port, "unix")
    config = write_config(tmp_path, [entry])
    transport = ["--vsock", f"unix:{sockets}/v"]
    host = Vtunnel("host", "--config-path", config, *transport, log_dir=tmp_path)
    # 48 descriptors: a few dozen clients exhaust them.
    peer = Vtunnel("peer", "--config-path", config, *transport, log_dir=tmp_path, max_files=48)
    try:
        wait_until(lambda: echo_works(entry["peer-port"]), what="the tunnel")
        held = [socket.create_connection(("127.0.0.1", entry["peer-port"])) for _ in range(60)]
        peer.wait_for_log("too many open files")
        assert peer.alive()
        for sock in held:
            sock.close()
        wait_until(lambda: echo_works(entry["peer-port"], 100_000), what="the peer to serve again")
        assert "Traceback" not in peer.log
    finally:
        assert peer.stop() == 0
        host.stop()
        echo.stop()


# ---------------------------------------------------------------- shutdown and limits

def test_sigterm_lets_open_transfers_finish_and_refuses_new_ones(faulty):
    f = faulty()
    entry = f.add_echo("echo")
    f.start()
    payload = os.urandom(4 * 1024 * 1024)
    result = {}
    sock = socket.create_connection(("127.0.0.1", entry["peer-port"]), timeout=30)

    def slow_client():
        def send():
            for offset in range(0, len(payload), 256 * 1024):  # about 1.6 s in all
                sock.sendall(payload[offset: offset + 256 * 1024])
                time.sleep(0.1)
            sock.shutdown(socket.SHUT_WR)
        sender = threading.Thread(target=send)
        sender.start()
        result["got"] = b"".join(iter(lambda: sock.recv(262144), b""))
        sender.join()
    client = threading.Thread(target=slow_client)
    client.start()
    time.sleep(0.4)
    f.d.peer.process.send_signal(15)
    f.d.peer.wait_for_log("SIGTERM")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", entry["peer-port"]), timeout=5)
    client.join(30)
    assert sha256(result["got"]) == sha256(payload)
    assert f.d.peer.stop() == 0
    assert "stats echo (peer): 0 open" in f.d.peer.log


def test_sigterm_closes_what_outlives_the_grace_period(tmp_path, deployment):
    echo = echo_server()
    d = deployment("tcp")
    entry = d.add_tunnel("echo", echo.port)
    d.start()
    wait_until(lambda: echo_works(entry["peer-port"]), what="the tunnel")
    idle = socket.create_connection(("127.0.0.1", entry["peer-port"]), timeout=30)
    idle.sendall(b"x")
    assert idle.recv(1) == b"x"
    start = time.monotonic()
    assert d.peer.stop() == 0  # --grace 2 (the deployment's)
    assert 1.5 < time.monotonic() - start < 8
    assert ended(idle)  # closed when the grace period ran out
    idle.close()
    echo.stop()


def test_max_connections_queues_clients_in_the_backlog(faulty):
    f = faulty()
    entry = f.add_echo("limited", **{"max-connections": 2})
    f.start()
    first = [socket.create_connection(("127.0.0.1", entry["peer-port"]), timeout=10) for _ in range(2)]
    for sock in first:
        sock.sendall(b"a")
        assert sock.recv(1) == b"a"
    waiting = socket.create_connection(("127.0.0.1", entry["peer-port"]), timeout=10)
    waiting.sendall(b"b")
    waiting.settimeout(1)
    with pytest.raises(socket.timeout):
        waiting.recv(1)  # queued, not served, not dropped
    assert echo_works(f.probe["peer-port"])  # the other tunnel does not slow down
    first[0].close()
    waiting.settimeout(10)
    assert waiting.recv(1) == b"b"  # served as soon as a slot frees up, its early byte kept
    for sock in first[1:] + [waiting]:
        sock.close()
    f.assert_healthy()


def test_idle_timeout_closes_quiet_connections_only(faulty):
    f = faulty()
    entry = f.add_echo("idle", **{"idle-timeout": 1})
    f.start()
    quiet = socket.create_connection(("127.0.0.1", entry["peer-port"]), timeout=10)
    busy = socket.create_connection(("127.0.0.1", entry["peer-port"]), timeout=10)
    start = time.monotonic()
    for _ in range(8):  # 2.4 s of traffic every 0.3 s
        busy.sendall(b"tick")
        assert busy.recv(4) == b"tick"
        time.sleep(0.3)
    quiet.settimeout(0)
    assert ended(quiet)  # closed after 1 s of silence, while busy went on
    assert time.monotonic() - start > 2
    busy.sendall(b"still")
    assert busy.recv(5) == b"still"
    wait_until(lambda: "idle for 1s" in f.d.logs(), what="an idle close in a log")  # whichever end's timer fired first
    quiet.close()
    busy.close()
    f.assert_healthy()


# ---------------------------------------------------------------- bad input on the wire

@pytest.mark.parametrize("answer,problem", [
    (b"github.com/someone-else/not-vtunnel-at-all-nope-x", "bytes that are not the seed phrase"),
    (b"\x00\xff" * 40, "bytes that are not the seed phrase"),
    (b"github.com/rancher", "18 bytes that are not the seed phrase"),
    (b"", "0 bytes that are not the seed phrase"),
], ids=["another-phrase", "binary", "cut-short", "closes-at-once"])
def test_a_wrong_handshake_is_rejected_and_logged(tmp_path, answer, problem):
    impostor = socket.create_server(("127.0.0.1", 0))
    entry = tunnel_entry("t", 1, "tcp")
    entry["handshake-port"] = impostor.getsockname()[1]

    def answer_all():
        while True:
            try:
                conn, _ = impostor.accept()
            except OSError:
                return
            conn.sendall(answer)
            conn.close()
    threading.Thread(target=answer_all, daemon=True).start()
    host = Vtunnel("host", "--config-path", write_config(tmp_path, [entry]), "--vsock", "tcp:127.0.0.1",
                   log_dir=tmp_path)
    try:
        host.wait_for_log(problem)
        host.wait_for_log("retrying")
        with pytest.raises(ConnectionRefusedError):  # no handshake, no listener
            socket.create_connection(("127.0.0.1", entry["vsock-host-port"]), timeout=5)
    finally:
        impostor.close()
        assert host.stop() == 0


def test_bytes_of_every_value_pass_unchanged(faulty):
    f = faulty()
    f.start()
    every = bytes(range(256)) * 4096
    assert exchange(f.probe["peer-port"], every) == every
    with socket.create_connection(("127.0.0.1", f.probe["peer-port"]), timeout=10) as sock:
        for piece in (b"", b"\x00", b"", b"\xff\r\n\x1a", b""):  # zero-length writes are no-ops
            sock.send(piece)
        sock.shutdown(socket.SHUT_WR)
        assert b"".join(iter(lambda: sock.recv(100), b"")) == b"\x00\xff\r\n\x1a"
    f.assert_healthy()
