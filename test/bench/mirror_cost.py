#!/usr/bin/env python3
"""The mirror's watcher cost: a peer with one mirror entry (mirror-ports 1024-65535) idle for 60 s while
1,000 TCP sockets are open on the machine (500 connections on loopback, both ends), against the same
peer with only a forward tunnel; CPU seconds from /proc/PID/task/*/schedstat (to the nanosecond).

    python test/bench/mirror_cost.py
"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

VTUNNEL = Path(__file__).resolve().parents[2] / "vtunnel.py"
SECONDS = 60


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu(pid):
    """CPU seconds the process has run, its threads included."""
    tasks = os.listdir(f"/proc/{pid}/task")
    return sum(int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0]) for task in tasks) / 1e9


def entry(kind):
    if kind == "mirror":
        return (f"  - name: vm-ports\n    handshake-port: {free_port()}\n    vsock-peer-port: {free_port()}\n"
                "    mirror-ports: 1024-65535\n")
    return (f"  - name: web\n    handshake-port: {free_port()}\n    vsock-host-port: {free_port()}\n"
            f"    peer-address: 127.0.0.1\n    peer-port: {free_port()}\n    upstream-server-address: 127.0.0.1:1\n")


def idle_cpu(kind):
    config = Path(f"/tmp/vtunnel-mirror-cost-{os.getpid()}.yaml")
    config.write_text("tunnel:\n" + entry(kind))
    peer = subprocess.Popen([sys.executable, str(VTUNNEL), "peer", "--vsock", "tcp:127.0.0.1", "--config-path",
                             str(config), "--log-level", "error"])
    try:
        time.sleep(3)
        start = cpu(peer.pid)
        time.sleep(SECONDS)
        return cpu(peer.pid) - start
    finally:
        peer.terminate()
        peer.wait()
        config.unlink()


def main():
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(500)]
    accepted = [listener.accept()[0] for _ in range(500)]
    used = {}
    for kind in ("mirror", "forward only"):
        used[kind] = idle_cpu(kind)
        print(f"{kind}: {used[kind]:.2f} CPU s in {SECONDS} s idle -> {used[kind] * 3600 / SECONDS:.0f} CPU s an hour",
              flush=True)
    entries = sum(1 for _ in open("/proc/net/tcp")) - 1
    watcher = (used["mirror"] - used["forward only"]) * 3600 / SECONDS
    print(f"/proc/net/tcp had {entries} entries; the watcher's own cost: {watcher:.0f} CPU s an hour")
    for sock in clients + accepted + [listener]:
        sock.close()


if __name__ == "__main__":
    main()
