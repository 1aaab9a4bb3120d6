import pytest

from helpers import Vtunnel, _next_vsock_port, echo_server, free_port, socket_dir, tunnel_entry, write_config
from hybrid_vmm import HybridVmm, unix_guest, vsock_guest


class Deployment:
    """A peer and a host (or one `local` process) over an emulated vsock transport."""

    def __init__(self, mode, tmp_path):
        self.mode, self.tmp_path = mode, tmp_path
        # "vsock": real AF_VSOCK, only inside the throwaway guest (test/vsockvm.sh): both ends at
        # CID 1 (loopback), which is where each end's legs come from, and so the CID each admits.
        self.transport = {"tcp": "tcp:127.0.0.1", "unix": f"unix:{socket_dir()}/v", "local": None,
                          "vsock": None, "hybrid": None, "hybrid-vsock": None}[mode]
        # "hybrid", "hybrid-vsock": the host of a Firecracker-style VM (--vsock hybrid:PATH), reaching the
        # peer through a stand-in VMM (test/hybrid_vmm.py): the peer on Unix sockets, or on real AF_VSOCK
        # inside the guest. vmm_answer: how the VMM answers CONNECT ("ok", "refuse", "silent").
        self.vmm, self.vmm_answer, self.vmm_dir = None, "ok", socket_dir()
        self.tunnels, self.peer, self.host, self.local = [], None, None, None

    def add_tunnel(self, name, upstream_port=None, upstream=None, peer_socket=None, **keys):
        kind = "tcp" if self.mode in ("tcp", "local") else "unix"  # (vsock port numbers)
        entry = tunnel_entry(name, upstream_port, kind, upstream=upstream)
        if peer_socket:
            del entry["peer-address"], entry["peer-port"]
            entry["peer-socket"] = str(peer_socket)
        entry.update(keys)
        self.tunnels.append(entry)
        self.config = write_config(self.tmp_path, self.tunnels)
        return entry

    def add_reverse(self, name, upstream, host_listen=None, **keys):
        """A reverse tunnel: the host listens on `host_listen` (a free loopback port unless given), the
        peer dials `upstream` ("IP:port" or "unix:///path")."""
        vsock_port = free_port if self.mode in ("tcp", "local") else _next_vsock_port
        entry = {"name": name, "handshake-port": vsock_port(), "vsock-peer-port": vsock_port(),
                 "host-listen-address": host_listen or f"127.0.0.1:{free_port()}",
                 "upstream-server-address": upstream, **keys}
        self.tunnels.append(entry)
        self.config = write_config(self.tmp_path, self.tunnels)
        return entry

    def start_peer(self):
        self.peer = self._start("peer")
        return self.peer

    def start_host(self):
        self.host = self._start("host")
        return self.host

    def start(self):
        if self.mode == "local":
            self.local = Vtunnel("local", "--config-path", self.config, "--log-level", "debug", "--grace", "2",
                                 log_dir=self.tmp_path)
        else:
            self.start_peer()
            self.start_host()
        return self

    def wait_ready(self, timeout=30):
        """Until the host end has handshaken and listens for every tunnel."""
        host = self.local or self.host
        for entry in self.tunnels:
            if "host-listen-address" in entry:
                host.wait_for_log(f"{entry['name']}: listening on {entry['host-listen-address']}", timeout)
                continue
            host.wait_for_log(f"{entry['name']}: listening on", timeout)
            host.wait_for_log(f"carrying to {entry['upstream-server-address']}", timeout)

    def _start(self, role):
        transport = self.transport or ("vsock:1" if self.mode == "vsock" else None)
        if self.mode.startswith("hybrid"):
            self._start_vmm()
            guest = f"unix:{self.vmm_dir}/guest" if self.mode == "hybrid" else "vsock:1"
            transport = f"hybrid:{self.vmm_dir}/vmm.sock" if role == "host" else guest
        return Vtunnel(role, "--config-path", self.config, *(["--vsock", transport] if transport else []),
                       "--log-level", "debug", "--grace", "2", log_dir=self.tmp_path)

    def _start_vmm(self):
        if self.vmm is None:
            guest = unix_guest(f"{self.vmm_dir}/guest") if self.mode == "hybrid" else vsock_guest(1)
            ports = [entry["vsock-host-port"] for entry in self.tunnels if "vsock-host-port" in entry]
            self.vmm = HybridVmm(f"{self.vmm_dir}/vmm.sock", guest, ports, self.vmm_answer)

    def processes(self):
        return [p for p in (self.peer, self.host, self.local) if p]

    def logs(self):
        return "\n".join(f"--- {p.args[0]}:\n{p.log}" for p in self.processes())

    def stop(self):
        codes = [p.stop() for p in self.processes()]
        if self.vmm:
            self.vmm.stop()
        return codes


@pytest.fixture
def deployment(tmp_path):
    made = []

    def make(mode):
        made.append(Deployment(mode, tmp_path))
        return made[-1]

    yield make
    for d in made:
        d.stop()
        print(d.logs())  # shown by pytest only when the test failed


@pytest.fixture
def echo():
    """A TCP echo server on loopback, for the test's length."""
    server = echo_server()
    yield server
    server.stop()
