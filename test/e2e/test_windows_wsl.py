"""Windows + WSL: the host here on Windows, the peer inside a WSL distribution.

Runs only on Windows with wsl.exe (and a distribution with python3, gevent, pyyaml and docopt-ng);
everywhere else it is skipped. The client runs inside WSL, where the peer listens.
"""

import os
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, Vtunnel, echo_server, free_port, sha256, wait_until, write_config

pytestmark = pytest.mark.skipif(not (sys.platform == "win32" and shutil.which("wsl.exe")),
                                reason="needs Windows with wsl.exe (a WSL2 distribution to run the peer)")

DISTRO = os.environ.get("VTUNNEL_WSL_DISTRO")  # default distribution if unset

CLIENT = r"""
import hashlib, os, socket, sys, threading
port, size = int(sys.argv[1]), int(sys.argv[2])
payload = os.urandom(size)
with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
    def send():
        s.sendall(payload); s.shutdown(socket.SHUT_WR)
    t = threading.Thread(target=send); t.start()
    got = b"".join(iter(lambda: s.recv(65536), b""))
    t.join()
print(hashlib.sha256(payload).hexdigest(), hashlib.sha256(got).hexdigest(), len(got))
"""


def wsl(*args, **kwargs):
    prefix = ["wsl.exe"] + (["-d", DISTRO] if DISTRO else []) + ["--"]
    return subprocess.run(prefix + list(args), capture_output=True, text=True, **kwargs)


def wsl_path(path):
    return wsl("wslpath", "-a", str(path).replace("\\", "/")).stdout.strip()


def test_echo_round_trips_from_wsl_through_the_windows_host(tmp_path):
    upstream = echo_server()
    entry = {"name": "wsl-echo", "handshake-port": 40000 + os.getpid() % 10000,
             "vsock-host-port": 50000 + os.getpid() % 10000, "peer-address": "127.0.0.1",
             "peer-port": free_port(), "upstream-server-address": f"127.0.0.1:{upstream.port}"}
    config = write_config(tmp_path, [entry])
    peer = subprocess.Popen(["wsl.exe"] + (["-d", DISTRO] if DISTRO else []) +
                            ["--", "python3", wsl_path(ROOT / "vtunnel.py"), "peer",
                             "--config-path", wsl_path(config)])
    host = Vtunnel("host", "--config-path", config, log_dir=tmp_path)
    try:
        host.wait_for_log("handshake with the peer", timeout=60)
        for size in (1, 65536, 8 * 1024 * 1024):
            def round_trip(size=size):
                done = wsl("python3", "-c", CLIENT, str(entry["peer-port"]), str(size), timeout=120)
                parts = done.stdout.split()
                return parts if len(parts) == 3 and parts[2] == str(size) else None
            sent, got, _ = wait_until(round_trip, timeout=60, what="an echo from inside WSL")
            assert sent == got
        assert any(count == 8 * 1024 * 1024 for count, _ in upstream.received)
        assert sha256(b"") not in host.log  # no payload is ever logged
    finally:
        host.stop()
        peer.terminate()
        upstream.stop()
