"""Real sockets, servers and vtunnel processes for the tests (loopback and Unix sockets only)."""

import contextlib
import hashlib
import http.server
import os
import random
import re
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import yaml

import vtunnel

ROOT = Path(__file__).resolve().parent.parent


MODES = ["tcp", "unix", "local"]  # peer and host over the tcp: or unix: transport, or one `local` process


def free_port():
    """A TCP port free on loopback, chosen at random below the kernel's ephemeral range, never one
    handed out before in this run.

    Not an ephemeral port: outgoing connections take their local ports from that range (a host's
    handshake attempts, many a second), and one of them took a port a peer was about to listen on
    (EADDRINUSE in two CI runs of the soak test). Never one handed out before, and each pytest-xdist
    worker in a range of its own: a port is free when picked and bound only later, by a vtunnel,
    and two picks of one port (in one config, or by two workers at once) failed two CI runs with
    EADDRINUSE.
    """
    low, high = _worker_range()
    for _ in range(1000):
        port = _random.randrange(low, high)
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free TCP port found between {low} and {high}")


_random = random.SystemRandom()  # never the seeded generator a test may have set
_handed_out = set()


def _worker_range():
    """This pytest-xdist worker's share of the ports between 10000 and the ephemeral range."""
    low, high = 10000, _ephemeral_range()[0]
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    span = (high - low) // max(count, 1)
    index = int(worker) % max(count, 1) if worker.isdigit() else 0
    return low + index * span, low + (index + 1) * span


def _ephemeral_range():
    try:
        return tuple(map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()))
    except OSError:
        return 49152, 65535  # Windows' (and IANA's) dynamic range


def wait_until(predicate, timeout=20.0, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def sha256(data):
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- upstreams

class _Serving:
    """A socketserver that serves in a thread of its own and records what each connection carried."""
    daemon_threads = True
    request_queue_size = 1024  # socketserver's 5 overflows under 50 concurrent connects: resets

    def __init__(self, handler, address):
        super().__init__(address, handler)
        self.received = []  # (bytes count, sha256) of every finished connection
        self.accepted = 0  # connections accepted, finished or not
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def process_request(self, request, client_address):
        with self.lock:
            self.accepted += 1
        super().process_request(request, client_address)

    def record(self, count, digest):
        with self.lock:
            self.received.append((count, digest))

    def stop(self):
        self.shutdown()
        self.server_close()


class _Server(_Serving, socketserver.ThreadingTCPServer):
    allow_reuse_address = True

    def __init__(self, handler, address=("127.0.0.1", 0)):
        super().__init__(handler, address)

    @property
    def port(self):
        return self.server_address[1]


if hasattr(socketserver, "ThreadingUnixStreamServer"):  # not on Windows, where helpers serve too
    class _UnixServer(_Serving, socketserver.ThreadingUnixStreamServer):
        pass


class _EchoHandler(socketserver.BaseRequestHandler):
    """Echoes every byte; on end of stream half-closes back, and records what it got."""

    def handle(self):
        digest, count = hashlib.sha256(), 0
        while data := self.request.recv(262144):
            digest.update(data)
            count += len(data)
            self.request.sendall(data)
        self.request.shutdown(socket.SHUT_WR)
        self.server.record(count, digest.hexdigest())


class _DigestAfterEofHandler(socketserver.BaseRequestHandler):
    """Reads until the client half-closes, then answers with a large reply derived from what it read."""

    def handle(self):
        digest, count = hashlib.sha256(), 0
        while data := self.request.recv(262144):
            digest.update(data)
            count += len(data)
        self.server.record(count, digest.hexdigest())
        self.request.sendall(reply_for(count, digest.hexdigest()))
        self.request.close()


def reply_for(count, hexdigest):
    """The half-close server's answer: big enough to need many reads after the client's FIN."""
    return f"{count} {hexdigest}\n".encode() * 20000


class _Server6(_Server):
    """An IPv6 _Server, for IPv6 only (IPV6_V6ONLY): a test of "::1" is not answered by IPv4 too."""
    address_family = socket.AF_INET6

    def server_bind(self):
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        super().server_bind()


def echo_server(port=0, host="127.0.0.1"):
    return (_Server6 if ":" in host else _Server)(_EchoHandler, (host, port))


def unix_echo_server(path):
    return _UnixServer(_EchoHandler, str(path))


def half_close_server():
    return _Server(_DigestAfterEofHandler)


def stream_bytes(size, seed=0):
    """Deterministic pseudo-random bytes, generated in 1 MiB blocks."""
    block = random.Random(seed).randbytes(1 << 20)
    for offset in range(0, size, len(block)):
        yield block[: min(len(block), size - offset)]


class _SourceHandler(socketserver.BaseRequestHandler):
    """Sends `server.size` bytes of stream_bytes, then closes: a download."""

    def handle(self):
        for block in stream_bytes(self.server.size):
            self.request.sendall(block)


def source_server(size):
    server = _Server(_SourceHandler)
    server.size = size
    return server


class HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, body):
        body_bytes = body

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(body_bytes)))
                self.end_headers()
                self.wfile.write(body_bytes)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self):
        return self.server_address[1]

    def stop(self):
        self.shutdown()
        self.server_close()


# ---------------------------------------------------------------- clients

def exchange(port, payload, timeout=60.0, host="127.0.0.1"):
    """Send payload (then half-close) while reading everything back; returns the bytes read."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        return exchange_on(sock, payload)


def unix_exchange(path, payload, timeout=60.0):
    """exchange() through a Unix socket: send payload, half-close, read to the end."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        return exchange_on(sock, payload)


def exchange_on(sock, payload):
    """Send payload (then half-close) while reading to the end; what arrived. Raises what failed."""
    received, failure = exchange_partly(sock, payload)
    if failure:
        raise failure
    return received


def exchange_partly(sock, payload):
    """exchange_on that keeps what arrived before a failure: (the bytes, the error or None)."""
    failures = []

    def send():
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            failures.append(exc)

    sender = threading.Thread(target=send)
    sender.start()
    chunks = []
    try:
        while data := sock.recv(262144):
            chunks.append(data)
    except OSError as exc:
        failures.insert(0, exc)
    sender.join()
    return b"".join(chunks), (failures[0] if failures else None)


class SlowTransfer(threading.Thread):
    """An echo client that sends half its payload, waits for `resume`, then sends the rest and
    half-closes, while a second thread reads the echo back: a transfer that spans a reload."""

    def __init__(self, port, size, resume):
        super().__init__(daemon=True)
        self.payload, self.resume = os.urandom(size), resume
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.received, self.failure = bytearray(), None
        self.halfway, self.ended = threading.Event(), threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        self.start()

    def run(self):
        half = len(self.payload) // 2
        self.sock.sendall(self.payload[:half])
        self.resume.wait()
        try:
            self.sock.sendall(self.payload[half:])
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.failure = self.failure or exc

    def _read(self):
        try:
            while data := self.sock.recv(262144):
                self.received += data
                if len(self.received) >= len(self.payload) // 2:
                    self.halfway.set()  # the echo of the first half is back: the tunnel carries it
        except OSError as exc:
            self.failure = exc
        self.ended.set()

    def intact(self):
        return self.failure is None and sha256(bytes(self.received)) == sha256(self.payload)


def read_all(stream):
    """Everything a socket (or a named pipe stream) gives until its end."""
    chunks = []
    while data := stream.recv(262144):
        chunks.append(data)
    return b"".join(chunks)


def how_it_ended(sock):
    """Read to the end: ('eof', the bytes) after a clean end of stream, or ('reset', None)."""
    try:
        return "eof", read_all(sock)
    except (ConnectionResetError, BrokenPipeError):
        return "reset", None


def reset(sock):
    """Close with a reset (RST), as a crashing or aborting program does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def echo_works(port, size=1024):
    payload = os.urandom(size)
    try:
        return exchange(port, payload, timeout=5) == payload
    except OSError:
        return False


# ---------------------------------------------------------------- vtunnel processes

def write_config(directory, tunnels):
    """tunnels: dicts with the config keys; returns the path of the YAML file."""
    path = Path(directory) / "config.yaml"
    path.write_text(yaml.safe_dump({"tunnel": tunnels}, sort_keys=False))
    return path


def tunnel_entry(name, upstream_port, transport="tcp", peer_port=None, upstream=None):
    """A config entry; with the tcp transport the vsock ports are free TCP ports too."""
    vsock_port = free_port if transport == "tcp" else _next_vsock_port
    return {
        "name": name,
        "handshake-port": vsock_port(),
        "vsock-host-port": vsock_port(),
        "peer-address": "127.0.0.1",
        "peer-port": peer_port or free_port(),
        "upstream-server-address": upstream or f"127.0.0.1:{upstream_port}",
    }


_vsock_ports = iter(range(5000, 10**6))


def _next_vsock_port():
    return next(_vsock_ports)


def socket_dir():
    """A short directory for Unix sockets (paths are limited to 107 bytes)."""
    return tempfile.mkdtemp(prefix="vt", dir="/tmp")


class Vtunnel:
    """A real `vtunnel` process; its log goes to a file the test can read."""

    def __init__(self, *args, log_dir, max_files=None, prefix=(), launcher=("-m", "vtunnel"), env=None):
        """prefix: a command that runs the vtunnel command line it is given (unshare, for one);
        launcher: what Python runs, vtunnel itself unless a test says otherwise; env: added to ours."""
        self.args = [str(a) for a in args]
        self.log_path = Path(log_dir) / f"vtunnel-{self.args[0]}-{time.monotonic_ns()}.log"
        self.log_file = open(self.log_path, "wb")
        limit = partial(_limit_files, max_files) if max_files else None
        self.process = subprocess.Popen([*prefix, sys.executable, *launcher, *self.args],
                                        env={**os.environ, **(env or {})}, stdout=self.log_file,
                                        stderr=subprocess.STDOUT, cwd=ROOT, preexec_fn=limit)

    @property
    def log(self):
        return self.log_path.read_text(errors="replace")

    def descriptors(self):
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def rss_kib(self):
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(status.split("VmRSS:")[1].split()[0])

    def snapshot(self):
        """Ask for the stats (SIGUSR1); returns what the process logged in answer (see parse_stats)."""
        before = len(self.log)
        self.process.send_signal(signal.SIGUSR1)
        wait_until(lambda: "process: " in self.log[before:], what="a stats snapshot")
        return parse_stats(self.log[before:])

    def alive(self):
        return self.process.poll() is None

    def wait_for_log(self, text, timeout=20):
        wait_until(lambda: text in self.log or not self.alive(), timeout, what=f"{text!r} in the log")
        assert text in self.log, f"vtunnel exited ({self.process.returncode}) without logging {text!r}:\n{self.log}"

    def stop(self, sig=signal.SIGTERM, timeout=15):
        if self.alive():
            self.process.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        if self.alive():
            self.process.kill()
            self.process.wait()
        self.log_file.close()
        return self.process.returncode

    def kill(self):
        return self.stop(signal.SIGKILL)


def parse_stats(text):
    """The newest 'stats' and 'process' log lines, as numbers: {label: {...}, 'process': {...}}."""
    found = {}
    for line in text.splitlines():
        stats = re.search(r"stats (.+?): (\d+) open, (\d+) total, (\d+) bytes to \S+, (\d+) bytes back, "
                          r"failures: (.*), legs refused: (.*)$", line)
        if stats:
            label, *numbers, failures, refused = stats.groups()
            found[label] = dict(zip(("open", "total", "to", "back"), map(int, numbers), strict=True))
            found[label]["failures"] = failures
            found[label]["refused"] = refused
        process = re.search(r"process: (\d+) greenlets, (\d+) file descriptors \((\d+) in spare splice pipes", line)
        if process:  # the pipes kept for reuse are the pump's, not a connection's: not counted as held
            found["process"] = {"greenlets": int(process[1]), "fds": int(process[2]) - int(process[3])}
    return found


def _limit_files(limit):
    """limit: the most open files, or (soft, hard) limits."""
    import resource  # Unix only: helpers also serve the Windows harness
    resource.setrlimit(resource.RLIMIT_NOFILE, limit if isinstance(limit, tuple) else (limit, limit))


def run_vtunnel(*args, timeout=30, python_options=()):
    """Run vtunnel to completion; returns (exit code, stdout, stderr)."""
    done = subprocess.run([sys.executable, *python_options, "-m", "vtunnel", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    return done.returncode, done.stdout, done.stderr


# ---------------------------------------------------------------- a stand-in Hyper-V (Linux and Wine alike)

class FakeHyperV(vtunnel.HyperVTransport):
    """FAKE AF_HYPERV: vsock port p of VM v is the loopback TCP port routes[v, p] (else p itself).

    It keeps HyperVTransport's own listen/connect/threadpool code and swaps only the family, the
    address and the Hyper-V socket options, which is what the real one differs in (neither Linux nor
    Wine can create AF_HYPERV sockets). The routes belong to the instance and to the per-VM
    transports made from it.
    """
    family = socket.AF_INET
    protocol = 0

    def __init__(self, vm_id=None, routes=None):
        super().__init__(vm_id)
        self.routes = {} if routes is None else routes

    def for_vm(self, vm_id):
        return type(self)(vm_id, self.routes)

    def listen_address(self, port):
        return ("127.0.0.1", self.routes.get((self.vm_id, port), port))

    dial_address = listen_address

    def set_options(self, sock, connect_timeout=None):
        pass  # the Hyper-V options have no TCP counterpart


class SeedServer(threading.Thread):
    """A stand-in peer's handshake listener, on plain sockets in a thread."""

    def __init__(self, answer):
        super().__init__(daemon=True)
        self.answer, self.running = answer, True
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.start()

    def run(self):
        while self.running:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            with conn:
                conn.sendall(self.answer)
        self.listener.close()

    def stop(self):
        self.running = False
        self.join(5)


def seed_server(answer=vtunnel.SEED_PHRASE):
    """(server, port)"""
    server = SeedServer(answer)
    return server, server.listener.getsockname()[1]


class Recording:
    """A stream whose sent bytes are kept: what an eavesdropper on a leg records."""

    def __init__(self, sock):
        self.sock, self.sent = sock, []

    def recv(self, size):
        return self.sock.recv(size)

    def sendall(self, data):
        self.sent.append(bytes(data))
        self.sock.sendall(data)


def refuses(port):
    """Whether a connection to the loopback `port` is refused now (nothing listens there)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    return False


def listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def eventually(predicate, seconds=10):
    """wait_until for tests that run gevent in their own process: the hub runs while it waits."""
    import gevent
    for _ in range(int(seconds * 10)):
        if predicate():
            return True
        gevent.sleep(0.1)
    return predicate()
