"""Cross-OS end to end: a real `vtunnel host` on the Windows Python (under Wine) with a TCP and a
named-pipe upstream, reached from a real Linux `vtunnel peer`, over the emulated tcp: transport
(Wine has no AF_HYPERV). Run by `tox -e windows`, which sets VTUNNEL_WINEPY."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import (
    ROOT,
    SlowTransfer,
    Vtunnel,
    echo_server,
    free_port,
    how_it_ended,
    reset,
    sha256,
    socket_dir,
    tunnel_entry,
    unix_echo_server,
    wait_until,
    write_config,
)

WINEPY = os.environ.get("VTUNNEL_WINEPY")
pytestmark = pytest.mark.skipif(not WINEPY or sys.platform == "win32" or not shutil.which("wine"),
                                reason="needs the Windows Python under Wine (tox -e windows sets VTUNNEL_WINEPY; "
                                       "winepy.sh installs wine as root)")


class WineProcess:
    """A Windows Python process under Wine; its output (pipes, as Wine needs) is kept as text."""

    def __init__(self, *args, marker):
        self.marker = marker  # a word of the command line that is this process's alone
        self.process = subprocess.Popen(["bash", WINEPY, *map(str, args)], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                        cwd=ROOT)
        self.lines = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def log(self):
        return "\n".join(self.lines)

    def wait_for(self, text, timeout=60):
        self._wait_until(lambda: text in self.log, timeout, repr(text))
        assert text in self.log, self.log

    def wait_for_match(self, pattern, timeout=60):
        """The first match of the regular expression `pattern` in the output, once there is one."""
        self._wait_until(lambda: re.search(pattern, self.log), timeout, repr(pattern))
        match = re.search(pattern, self.log)
        assert match, self.log
        return match

    def _wait_until(self, found, timeout, what):
        """Until found() or the process ends; a timeout shows the output, which says what happened instead."""
        try:
            wait_until(lambda: found() or self.process.poll() is not None, timeout, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the output so far:\n{self.log}") from None

    def stop(self):
        self.process.kill()
        subprocess.run(["pkill", "-f", self.marker], check=False)  # the Windows python.exe under wine
        # pkill only sends the signal: until python.exe is gone, its pipe instances still take clients.
        wait_until(lambda: subprocess.run(["pgrep", "-f", self.marker], capture_output=True).returncode == 1,
                   timeout=20, what=f"the Windows process {self.marker} to exit")
        self.process.wait(10)


def round_trip(sock, payload):
    """Send payload and read exactly as many bytes back (pipes cannot half-close)."""
    sender = threading.Thread(target=sock.sendall, args=(payload,))
    sender.start()
    chunks, got = [], 0
    while got < len(payload):
        data = sock.recv(262144)
        assert data, "the tunnel closed early"
        chunks.append(data)
        got += len(data)
    sender.join()
    return b"".join(chunks)


@pytest.fixture
def cross(tmp_path):
    pipe = rf"\\.\pipe\vtunnel-cross-{os.getpid()}"
    pipe_server = WineProcess(ROOT / "test/windows/pipe_echo_server.py", pipe, 8, marker=f"vtunnel-cross-{os.getpid()}")
    tcp_upstream = echo_server()
    sockets = socket_dir()
    tcp = tunnel_entry("tcp-up", tcp_upstream.port, "tcp")
    npipe = tunnel_entry("pipe-up", 1, "tcp", upstream="npipe://" + pipe.replace("\\", "/"))
    agent = tunnel_entry("agent-shape", 1, "tcp", upstream="npipe://" + pipe.replace("\\", "/"))
    del agent["peer-address"], agent["peer-port"]
    agent["peer-socket"] = f"{sockets}/agent.sock"
    config = write_config(tmp_path, [tcp, npipe, agent])
    pipe_server.wait_for("ready")
    host = WineProcess(ROOT / "test/windows/run_vtunnel.py", "host", "--config-path", config,
                       "--vsock", "tcp:127.0.0.1", "--log-level", "debug", marker=str(config))
    peer = Vtunnel("peer", "--config-path", config, "--vsock", "tcp:127.0.0.1", log_dir=tmp_path)
    try:
        for name in ("tcp-up", "pipe-up", "agent-shape"):
            host.wait_for(f"{name}: listening on")
        yield {"tcp": tcp, "pipe": npipe, "agent": agent, "host": host, "peer": peer, "pipes": pipe_server,
               "upstream": tcp_upstream}
    finally:
        print("--- windows host:\n" + host.log + "\n--- linux peer:\n" + peer.log)
        peer.stop()
        host.stop()
        pipe_server.stop()
        tcp_upstream.stop()


def test_windows_host_carries_tcp_and_named_pipe_upstreams(cross):
    payload = os.urandom(4 * 1024 * 1024)
    with socket.create_connection(("127.0.0.1", cross["tcp"]["peer-port"]), timeout=60) as sock:
        assert sha256(round_trip(sock, payload)) == sha256(payload)
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", cross["pipe"]["peer-port"]), timeout=60) as sock:
            assert sha256(round_trip(sock, payload)) == sha256(payload)
    cross["pipes"].wait_for(f"got {len(payload)} {sha256(payload)}")
    wait_until(lambda: (len(payload), sha256(payload)) in cross["upstream"].received, what="the TCP upstream")


def test_linux_unix_socket_to_windows_named_pipe(cross):
    """The ssh-agent shape: a Linux client on the peer's socket, a Windows pipe at the far end."""
    path = cross["agent"]["peer-socket"]
    wait_until(lambda: Path(path).exists(), what="the peer's socket")
    payload = os.urandom(1024 * 1024)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(60)
        sock.connect(path)
        assert sha256(round_trip(sock, payload)) == sha256(payload)
    cross["pipes"].wait_for(f"got {len(payload)} {sha256(payload)}")


def test_a_missing_pipe_is_one_connection_error_and_the_host_keeps_serving(cross, tmp_path):
    cross["pipes"].stop()  # the pipe server is gone
    with socket.create_connection(("127.0.0.1", cross["pipe"]["peer-port"]), timeout=30) as sock:
        sock.sendall(b"anyone?")
        try:
            assert sock.recv(10) == b""
        except ConnectionResetError:
            pass
    cross["host"].wait_for("upstream unreachable: no such named pipe")
    payload = os.urandom(100_000)
    with socket.create_connection(("127.0.0.1", cross["tcp"]["peer-port"]), timeout=60) as sock:
        assert sha256(round_trip(sock, payload)) == sha256(payload)


# ---------------------------------------------------------------- the named-pipe leg of the failure matrix
# A named pipe has no reset and no half-close: its server closing its end, for whatever reason, is the
# only end a pipe has. So a failure cannot travel over a pipe leg, in either direction; these tests pin
# down what each side sees, and that a failure made by the Windows host itself still reaches the Linux
# client as a reset. (The vsock leg here is the tcp: transport: Wine has no AF_HYPERV.)

BURST = 300_000


@pytest.fixture(scope="module")
def pipe_faults(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe-faults")
    names = {kind: rf"\\.\pipe\vtunnel-{kind}-{os.getpid()}" for kind in ("echo", "burst")}
    servers = [WineProcess(ROOT / "test/windows/pipe_echo_server.py", names["echo"], 4,
                           marker=f"vtunnel-echo-{os.getpid()}"),
               WineProcess(ROOT / "test/windows/pipe_echo_server.py", names["burst"], 4, "burst", BURST,
                           marker=f"vtunnel-burst-{os.getpid()}")]
    upstream = {kind: "npipe://" + name.replace("\\", "/") for kind, name in names.items()}
    tunnels = [tunnel_entry("pipe-echo", 1, "tcp", upstream=upstream["echo"]),
               tunnel_entry("pipe-burst", 1, "tcp", upstream=upstream["burst"]),
               tunnel_entry("pipe-idle", 1, "tcp", upstream=upstream["echo"])]
    (tmp / "peer").mkdir()
    peer_config = write_config(tmp / "peer", tunnels)
    tunnels[2]["idle-timeout"] = 1  # the Windows host's alone: it is the end that fails the connection
    host_config = write_config(tmp, tunnels)
    for server in servers:
        server.wait_for("ready")
    host = WineProcess(ROOT / "test/windows/run_vtunnel.py", "host", "--config-path", host_config,
                       "--vsock", "tcp:127.0.0.1", "--log-level", "debug", marker=str(host_config))
    peer = Vtunnel("peer", "--config-path", peer_config, "--vsock", "tcp:127.0.0.1", log_dir=tmp)
    try:
        for tunnel in tunnels:
            host.wait_for(f"{tunnel['name']}: listening on")
        yield {"ports": {t["name"]: t["peer-port"] for t in tunnels}, "host": host, "peer": peer,
               "echo": servers[0], "burst": servers[1]}
    finally:
        print("--- windows host:\n" + host.log + "\n--- linux peer:\n" + peer.log)
        peer.stop()
        host.stop()
        for server in servers:
            server.stop()


def test_a_pipe_server_that_closes_mid_reply_reaches_the_client_as_an_end_of_stream(pipe_faults):
    with socket.create_connection(("127.0.0.1", pipe_faults["ports"]["pipe-burst"]), timeout=60) as sock:
        sock.sendall(b"a request the server never reads")
        what, received = how_it_ended(sock)
    assert what == "eof"  # a pipe's only end: the client cannot tell it from a complete reply
    pipe_faults["burst"].wait_for(f"sent {len(received)} {sha256(received)}")  # every byte before it


def test_a_linux_client_that_resets_reaches_the_pipe_server_as_its_end(pipe_faults):
    payload = os.urandom(100_000)
    with socket.create_connection(("127.0.0.1", pipe_faults["ports"]["pipe-echo"]), timeout=60) as sock:
        sock.sendall(payload)
        assert sock.recv(1)  # the echo has started: the pipe server is mid-stream
        reset(sock)  # with the rest of the echo unread
    # The pipe server's read ends (its only kind of end): it got a prefix of the upload, every byte of
    # it, as far as the reset let the bytes in flight through.
    got = pipe_faults["echo"].wait_for_match(r"got (\d+) (\w+)")
    count = int(got[1])
    assert 0 < count <= len(payload) and got[2] == sha256(payload[:count])
    pipe_faults["peer"].wait_for_log("failed (client: connection reset by peer)")


def test_a_connection_the_windows_host_fails_is_reset_at_the_linux_client(pipe_faults):
    with socket.create_connection(("127.0.0.1", pipe_faults["ports"]["pipe-idle"]), timeout=60) as sock:
        assert round_trip(sock, b"ping") == b"ping"
        assert how_it_ended(sock)[0] == "reset"  # the host's idle timeout, 1 s later
    # Both directions have been quiet since the echo: the end named is whichever timed out first.
    pipe_faults["host"].wait_for_match(r"pipe-idle #\d+ failed \((peer|upstream): idle for 1s\)")
    wait_until(lambda: re.search(r"pipe-idle #\d+ failed \(host: connection reset by peer\)", pipe_faults["peer"].log),
               what="the peer's close line")



# ---------------------------------------------------------------- reload where there is no SIGHUP

def windows_vtunnel(*args):
    """Run a vtunnel command with the Windows Python to its end: (exit code, output)."""
    done = subprocess.run(["bash", WINEPY, ROOT / "test/windows/run_vtunnel.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    return done.returncode, done.stdout + done.stderr


def test_vtunnel_reload_reloads_a_windows_host(tmp_path):
    """Windows has no SIGHUP: `vtunnel reload --metrics`, run by the Windows Python, reloads the Windows
    host. A named-pipe tunnel is added while a checksummed transfer runs through the kept one."""
    pipe = rf"\\.\pipe\vtunnel-reload-{os.getpid()}"
    pipes = WineProcess(ROOT / "test/windows/pipe_echo_server.py", pipe, 4, marker=f"vtunnel-reload-{os.getpid()}")
    upstream = echo_server()
    keep = tunnel_entry("keep", upstream.port, "tcp")
    config = write_config(tmp_path, [keep])
    metrics = f"127.0.0.1:{free_port()}"
    pipes.wait_for("ready")
    host = WineProcess(ROOT / "test/windows/run_vtunnel.py", "host", "--config-path", config, "--vsock",
                       "tcp:127.0.0.1", "--metrics", metrics, marker=str(config))
    peer = Vtunnel("peer", "--config-path", config, "--vsock", "tcp:127.0.0.1", log_dir=tmp_path)
    try:
        host.wait_for("keep: listening on")
        host.wait_for("metrics: serving")
        resume = threading.Event()
        transfer = SlowTransfer(keep["peer-port"], 8 * 1024 * 1024, resume)
        assert transfer.halfway.wait(60)
        added = tunnel_entry("pipe", 1, "tcp", upstream="npipe://" + pipe.replace("\\", "/"))
        write_config(tmp_path, [keep, added])
        peer.process.send_signal(signal.SIGHUP)
        code, output = windows_vtunnel("reload", "--metrics", metrics)
        print(f"$ vtunnel reload --metrics {metrics}   (the Windows Python)\n{output}")
        assert code == 0 and "reloaded: 1 added (pipe), 0 changed, 0 removed, 1 kept" in output
        resume.set()
        assert transfer.ended.wait(60) and transfer.intact(), transfer.failure
        host.wait_for("pipe: listening on")
        payload = os.urandom(1024 * 1024)
        with socket.create_connection(("127.0.0.1", added["peer-port"]), timeout=60) as sock:
            assert sha256(round_trip(sock, payload)) == sha256(payload)
        code, output = windows_vtunnel("status", "--metrics", metrics)
        print(f"$ vtunnel status --metrics {metrics}   (the Windows Python)\n{output}")
        assert code == 0 and "2/2 tunnel(s) connected to the peer; reloads: 1 ok, 0 invalid, 0 failed" in output
        assert re.search(r"^keep +host +yes +0 +1 +8\.0 MiB +8\.0 MiB", output, re.M)
        assert re.search(r"^pipe +host +yes +[01] +1 ", output, re.M)  # a pipe lingers up to 5 s after its client
        assert "keep: listening on" in host.log and host.log.count("keep: listening on") == 1
    finally:
        print("--- windows host:\n" + host.log + "\n--- linux peer:\n" + peer.log)
        peer.stop()
        host.stop()
        pipes.stop()
        upstream.stop()


# ---------------------------------------------------------------- a reverse tunnel: the Windows host listens on a pipe

def test_windows_programs_reach_a_vm_service_through_a_pipe_the_windows_host_listens_on(tmp_path):
    """The Docker shape, reversed: a Windows `vtunnel host` listens on a named pipe, a Linux peer dials a
    Unix-socket upstream "in the VM"; 8 Windows clients (the Windows Python) open the pipe at once and
    echo 1 MiB each, SHA-256 both ways; the pipe admits only the user running vtunnel."""
    sockets = socket_dir()
    upstream = unix_echo_server(f"{sockets}/docker.sock")
    pipe = rf"\\.\pipe\vtunnel-rev-{os.getpid()}"
    entry = {"name": "docker", "handshake-port": free_port(), "vsock-peer-port": free_port(),
             "host-listen-address": "npipe://" + pipe.replace("\\", "/"),
             "upstream-server-address": f"unix://{sockets}/docker.sock"}
    config = write_config(tmp_path, [entry])
    peer = Vtunnel("peer", "--config-path", config, "--vsock", "tcp:127.0.0.1", log_dir=tmp_path)
    host = WineProcess(ROOT / "test/windows/run_vtunnel.py", "host", "--config-path", config, "--vsock",
                       "tcp:127.0.0.1", marker=str(config))
    try:
        host.wait_for(f"docker: listening on {entry['host-listen-address']}")
        done = subprocess.run(["bash", WINEPY, ROOT / "test/windows/pipe_clients.py", pipe, "8", str(1024 * 1024)],
                              cwd=ROOT, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
        print(done.stdout, done.stderr)
        clients = re.findall(r"^client (\d+) sent (\w+) got (\w+)$", done.stdout, re.M)
        assert sorted(int(n) for n, _, _ in clients) == list(range(8))
        assert all(sent == got for _, sent, got in clients)
        for _, sent, _ in clients:  # and the upstream in the VM got each upload, byte for byte
            wait_until(lambda sent=sent: (1024 * 1024, sent) in upstream.received, what="the upstream's count")
        dacl = re.search(r"^dacl (.*)$", done.stdout, re.M)[1]
        wanted = re.search(r"^wanted (.*)$", done.stdout, re.M)[1]
        assert dacl == wanted and wanted.startswith("D:P(A;;GA;;;S-1-5-") and wanted.endswith("(A;;GA;;;SY)")
    finally:
        print("--- windows host:\n" + host.log + "\n--- linux peer:\n" + peer.log)
        peer.stop()
        host.stop()
        upstream.stop()


# ---------------------------------------------------------------- thousands of idle connections (issue 26)

IDLE_CONNECTIONS = int(os.environ.get("VTUNNEL_IDLE_CONNECTIONS", 2000))  # more: see the README


def wine_process_status(marker):
    """(threads, resident KiB) of the Windows Python process whose command line holds `marker`."""
    pid = subprocess.run(["pgrep", "-f", f"python.exe.*{marker}"], capture_output=True, text=True).stdout.split()[0]
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["Threads"]), int(fields["VmRSS"].split()[0])


def echo_64_mib(port):
    """Seconds a checksummed 64 MiB echo through the tunnel takes."""
    payload = os.urandom(64 * 1024 * 1024)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        assert sha256(round_trip(sock, payload)) == sha256(payload)
    return time.monotonic() - started


def new_connection_echoes(port):
    """Seconds a new connection takes to echo b'ping' through the tunnel."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        assert round_trip(sock, b"ping") == b"ping"
    return time.monotonic() - started


def test_a_windows_host_holds_thousands_of_idle_named_pipe_connections(tmp_path):
    """2,000 idle connections through a Windows host to a named pipe: each holds a pending read at
    both of the host's ends and no thread, so a new connection is served at every point and a 64 MiB
    transfer beside them keeps every byte. With a thread per pending read (a 1,024-thread pool),
    the host stopped serving anyone past ~1,024."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2 * IDLE_CONNECTIONS + 1000:  # the peer holds two descriptors per connection
        pytest.skip(f"the descriptor limit ({hard}) is too low for {IDLE_CONNECTIONS} idle connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    pipe = rf"\\.\pipe\vtunnel-idle-{os.getpid()}"
    pipes = WineProcess(ROOT / "test/windows/pipe_echo_server.py", pipe, 16, "overlapped",
                        marker=f"vtunnel-idle-{os.getpid()}")
    entry = tunnel_entry("idle", 1, "tcp", upstream="npipe://" + pipe.replace("\\", "/"))
    config = write_config(tmp_path, [entry])
    pipes.wait_for("ready")
    host = WineProcess(ROOT / "test/windows/run_vtunnel.py", "host", "--config-path", config,
                       "--vsock", "tcp:127.0.0.1", marker=str(config))
    peer = Vtunnel("peer", "--config-path", config, "--vsock", "tcp:127.0.0.1", log_dir=tmp_path)
    idle = []
    try:
        host.wait_for("idle: listening on")
        port = entry["peer-port"]
        print(f"no idle connections: a new one echoes in {new_connection_echoes(port):.3f}s; "
              f"host threads, KiB: {wine_process_status(config)}; 64 MiB echoed in {echo_64_mib(port):.1f}s")
        for count in range(1, IDLE_CONNECTIONS + 1):
            sock = socket.create_connection(("127.0.0.1", port), timeout=60)
            idle.append(sock)
            assert round_trip(sock, b"x") == b"x"  # through to the pipe server: both host ends are open
            if count % 500 == 0:
                print(f"{count} idle: a new one echoes in {new_connection_echoes(port):.3f}s; "
                      f"host threads, KiB: {wine_process_status(config)}")
        print(f"64 MiB echoed beside {len(idle)} idle connections in {echo_64_mib(port):.1f}s")
        assert round_trip(idle[0], b"still there") == b"still there"
    finally:
        for sock in idle:
            sock.close()
        print("--- windows host:\n" + "\n".join(host.lines[-40:]) + "\n--- linux peer:\n" + peer.log[-4000:])
        peer.stop()
        host.stop()
        pipes.stop()


def test_a_windows_host_mirrors_a_linux_peers_ports(tmp_path):
    """mirror-ports with the host on Windows: a service started on the Linux side appears on the
    Windows host's listener (VM port + offset), carries 4 MiB both ways, and goes when it stops."""
    service = echo_server()
    offset = 0
    for offset in range(1000, 20000, 997):  # a host port that is free
        try:
            socket.create_server(("127.0.0.1", service.port + offset)).close()
            break
        except OSError:
            continue
    entry = {"name": "vm-ports", "handshake-port": free_port(), "vsock-peer-port": free_port(),
             "mirror-ports": str(service.port), "host-listen-address": "127.0.0.1", "host-port-offset": offset}
    config = write_config(tmp_path, [entry])
    host = WineProcess(ROOT / "test/windows/run_vtunnel.py", "host", "--config-path", config,
                       "--vsock", "tcp:127.0.0.1", marker=str(config))
    peer = Vtunnel("peer", "--config-path", config, "--vsock", "tcp:127.0.0.1", log_dir=tmp_path)
    port = service.port + offset
    try:
        host.wait_for(f"vm-ports: VM port {service.port} (127.0.0.1) mirrored: listening on 127.0.0.1:{port}")
        payload = os.urandom(4 * 1024 * 1024)
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            assert sha256(round_trip(sock, payload)) == sha256(payload)
        service.stop()
        host.wait_for(f"vm-ports: VM port {service.port} is gone: no longer listening on 127.0.0.1:{port}")
    finally:
        print("--- windows host:\n" + host.log + "\n--- linux peer:\n" + peer.log)
        peer.stop()
        host.stop()
        service.stop()
