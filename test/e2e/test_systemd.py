"""systemd's sd_notify protocol against a real datagram socket standing in for systemd: readiness,
status, the watchdog's cadence (and its silence while the event loop is stalled), stopping."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import ROOT, Vtunnel, socket_dir, tunnel_entry, wait_until, write_config

WATCHDOG_USEC = 400_000  # pings every 0.2 s


class FakeSystemd(threading.Thread):
    """The NOTIFY_SOCKET end: a thread stamps every datagram with its arrival, seconds from the start."""

    def __init__(self, abstract=False):
        super().__init__(daemon=True)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"vtunnel-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.address = f"{socket_dir()}/notify"
            self.sock.bind(self.address)
        self.messages, self.started = [], time.monotonic()
        self.start()

    def run(self):
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            self.messages.append((time.monotonic() - self.started, data.decode()))

    def said(self, text):
        return any(text in message for _, message in list(self.messages))

    def pings(self, since=0.0, until=float("inf")):
        return [at for at, message in list(self.messages) if message == "WATCHDOG=1" and since <= at < until]


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_status_watchdog_and_stopping(tmp_path, abstract):
    systemd = FakeSystemd(abstract)
    entries = [tunnel_entry("a", 1), tunnel_entry("b", 1)]
    vtunnel = Vtunnel("local", "--config-path", write_config(tmp_path, entries), log_dir=tmp_path,
                      env={"NOTIFY_SOCKET": systemd.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)},
                      launcher=(ROOT / "test/e2e/inject.py", "stall_on_sigusr2"))
    try:
        wait_until(lambda: systemd.said("READY=1"), what="READY=1")
        ready = next(message for _, message in systemd.messages if "READY=1" in message)
        assert ready.startswith("READY=1\nSTATUS=") and "tunnel(s) connected to the peer" in ready
        wait_until(lambda: systemd.said("STATUS=2/2 tunnel(s) connected to the peer"), what="both tunnels up")
        # The watchdog: pings at half of WATCHDOG_USEC while the loop runs...
        time.sleep(1.2)
        now = time.monotonic() - systemd.started
        assert len(systemd.pings(now - 1.0, now)) >= 3
        # ...and none while the loop is stuck in a call for a second (inject.py's stall_on_sigusr2).
        vtunnel.process.send_signal(signal.SIGUSR2)
        time.sleep(0.1)
        stalled_from = time.monotonic() - systemd.started
        time.sleep(0.8)
        stalled_until = time.monotonic() - systemd.started
        wait_until(lambda: systemd.pings(stalled_until), what="the pings to resume")
        assert systemd.pings(stalled_from, stalled_until) == []
        assert vtunnel.stop() == 0
        assert systemd.said("STOPPING=1")
        order = [message.split("\n")[0] for _, message in systemd.messages if message != "WATCHDOG=1"]
        assert order[0] == "READY=1" and order[-1] == "STOPPING=1"
    finally:
        vtunnel.stop()


def test_without_notify_socket_nothing_is_sent_and_a_dead_socket_is_one_warning(tmp_path):
    path = f"{socket_dir()}/nobody-listens"
    vtunnel = Vtunnel("local", "--config-path", write_config(tmp_path, [tunnel_entry("a", 1)]), log_dir=tmp_path,
                      env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    try:
        vtunnel.wait_for_log("a: listening on tcp:")
        time.sleep(0.6)  # a few pings, each refused
        assert vtunnel.log.count(f"cannot tell systemd (NOTIFY_SOCKET={path})") == 1
        assert vtunnel.alive()
    finally:
        assert vtunnel.stop() == 0


def test_a_reload_is_told_to_systemd(tmp_path):
    """RELOADING=1 with MONOTONIC_USEC at the start of a reload, READY=1 at its end: a good config's
    and a bad one's alike (the bad one changed nothing, and the process is as ready as before)."""
    systemd = FakeSystemd()
    first = tunnel_entry("a", 1)
    config = write_config(tmp_path, [first])
    vtunnel = Vtunnel("local", "--config-path", config, log_dir=tmp_path, env={"NOTIFY_SOCKET": systemd.address})
    try:
        wait_until(lambda: systemd.said("STATUS=1/1 tunnel(s) connected to the peer"), what="the tunnel up")
        for write in (lambda: write_config(tmp_path, [first, tunnel_entry("b", 1)]),
                      lambda: config.write_text("tunnel: [oops")):
            write()
            said = len(systemd.messages)
            before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            vtunnel.process.send_signal(signal.SIGHUP)
            wait_until(lambda said=said: any(m.startswith("READY=1") for _, m in systemd.messages[said:]),
                       what="READY=1 after the reload")
            after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            told = [m for _, m in systemd.messages[said:] if m != "WATCHDOG=1"]
            lines = told[0].split("\n")
            assert lines[0] == "RELOADING=1" and lines[1].startswith("MONOTONIC_USEC=")
            assert before <= int(lines[1].split("=")[1]) <= after
            assert next(m for m in told if m.startswith("READY=1")).startswith("READY=1\nSTATUS=")
        assert "reload: 1 added (b), 0 changed, 0 removed, 1 kept" in vtunnel.log
        assert "reload: nothing changed" in vtunnel.log
    finally:
        assert vtunnel.stop() == 0


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="a read-only mount needs root")
@pytest.mark.parametrize("runtime_directory", ["/run/vtunnel", None], ids=["unit", "no-unit"])
def test_a_socket_where_the_sandbox_forbids_names_the_directory_that_works(tmp_path, runtime_directory):
    """ProtectSystem=strict leaves only the unit's RuntimeDirectory writable: a peer-socket elsewhere fails
    to bind with EROFS, and the message says where it may go (systemd gives the unit $RUNTIME_DIRECTORY).
    A read-only bind mount in a mount namespace of the test's own stands in for the sandbox here;
    test/service.sh shows the same under a real systemd."""
    read_only = Path(socket_dir())
    entry = {**tunnel_entry("docker-host", 1), "peer-socket": f"{read_only}/docker.sock"}
    del entry["peer-address"], entry["peer-port"]
    config = write_config(tmp_path, [entry])
    sandbox = f"mount --bind -o ro {read_only} {read_only} && exec \"$@\""
    done = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", sandbox, "sh",
                           sys.executable, "-m", "vtunnel", "peer", "--vsock", "tcp:127.0.0.1", "--config-path",
                           str(config)], capture_output=True, text=True, timeout=30, cwd=ROOT,
                          env={**os.environ, **({"RUNTIME_DIRECTORY": runtime_directory} if runtime_directory else {})})
    failure = f"vtunnel: tunnel 'docker-host': cannot listen on unix://{read_only}/docker.sock: read-only file system"
    hint = " (this service may create files only under /run/vtunnel, its RuntimeDirectory: put the socket there)"
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == failure + (hint if runtime_directory else "")
