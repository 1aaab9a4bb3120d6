"""Windows + WSL: the host here on Windows, the peer inside a WSL distribution.

Runs only on Windows with wsl.exe (and a distribution with python3, gevent, pyyaml and docopt-ng);
everywhere else it is skipped. The client runs inside WSL, where the peer listens.
"""

import os
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT, Vtunnel, echo_server, free_port, wait_until, write_config

pytestmark = pytest.mark.skipif(not (sys.platform == "win32" and shutil.which("wsl.exe")),
                                reason="needs Windows with wsl.exe (a WSL2 distribution to run the peer)")

DISTRO = os.environ.get("VTUNNEL_WSL_DISTRO")  # default distribution if unset

CLIENT = r"""
import hashlib, os, socket, sys, threading
port, size = int(sys.argv[1]), int(sys.argv[2])
payload = os.urandom(size)
with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
    t = threading.Thread(target=s.sendall, args=(payload,)); t.start()
    got = b""
    while len(got) < size:  # exactly as many bytes back: named pipes cannot half-close
        chunk = s.recv(65536)
        if not chunk:
            break
        got += chunk
    t.join()
print(hashlib.sha256(payload).hexdigest(), hashlib.sha256(got).hexdigest(), len(got))
"""


def wsl(*args, **kwargs):
    prefix = ["wsl.exe"] + (["-d", DISTRO] if DISTRO else []) + ["--"]
    return subprocess.run(prefix + list(args), capture_output=True, text=True, **kwargs)


def wsl_path(path):
    return wsl("wslpath", "-a", str(path).replace("\\", "/")).stdout.strip()


def test_echo_round_trips_from_wsl_through_the_windows_host(tmp_path):
    """A TCP upstream and a named-pipe upstream, each reached from a client inside WSL."""
    upstream = echo_server()
    pipe = rf"\\.\pipe\vtunnel-wsl-{os.getpid()}"
    pipe_server = subprocess.Popen([sys.executable, str(ROOT / "test/windows/pipe_echo_server.py"), pipe, "4"],
                                   stdout=subprocess.PIPE, text=True)
    assert pipe_server.stdout.readline().strip() == "ready"
    base = 40000 + os.getpid() % 10000
    entries = [{"name": name, "handshake-port": base + 2 * i, "vsock-host-port": base + 2 * i + 1,
                "peer-address": "127.0.0.1", "peer-port": free_port(), "upstream-server-address": address}
               for i, (name, address) in enumerate([("wsl-tcp", f"127.0.0.1:{upstream.port}"),
                                                    ("wsl-pipe", "npipe://" + pipe.replace("\\", "/"))])]
    config = write_config(tmp_path, entries)
    peer = subprocess.Popen(["wsl.exe"] + (["-d", DISTRO] if DISTRO else []) +
                            ["--", "python3", wsl_path(ROOT / "vtunnel.py"), "peer",
                             "--config-path", wsl_path(config)])
    host = Vtunnel("host", "--config-path", config, log_dir=tmp_path)
    try:
        for entry in entries:
            host.wait_for_log(f"{entry['name']}: listening on", timeout=60)
        for entry in entries:
            for size in (1, 65536, 4 * 1024 * 1024):
                def round_trip(size=size, port=entry["peer-port"]):
                    done = wsl("python3", "-c", CLIENT, str(port), str(size), timeout=120)
                    parts = done.stdout.split()
                    return parts if len(parts) == 3 and parts[2] == str(size) else None
                sent, got, _ = wait_until(round_trip, timeout=60, what=f"an echo from inside WSL ({entry['name']})")
                assert sent == got
        assert any(count == 4 * 1024 * 1024 for count, _ in upstream.received)
    finally:
        host.stop()
        peer.terminate()
        pipe_server.kill()
        upstream.stop()
