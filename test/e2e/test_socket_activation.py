"""systemd socket activation, with systemd's own `systemd-socket-activate` (Debian: systemd) holding the
sockets: it listens, waits for the first client, then runs vtunnel with the sockets as descriptors 3 and
up (LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES), as a `.socket` unit does."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.request

import pytest

from helpers import (
    ROOT,
    Vtunnel,
    echo_works,
    exchange,
    free_port,
    refuses,
    sha256,
    socket_dir,
    tunnel_entry,
    unix_exchange,
    wait_until,
    write_config,
)

pytestmark = pytest.mark.skipif(not shutil.which("systemd-socket-activate"),
                                reason="needs systemd-socket-activate (Debian: systemd)")
MiB = 1024 * 1024

# Runs vtunnel twice with the sockets it was given, as systemd restarts a service: this shell keeps them
# open in between (the restart's queue), and the second start waits until the test opens $GATE.
TWICE = """
run() { sh -c 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"' sh "$@"; }
run "$@"
cat "$GATE" >/dev/null
run "$@"
"""


class Activated:
    """systemd-socket-activate listening on `listens` (IP:PORT or a path), named `names`, then running
    `vtunnel ARGS` (through `script`, a shell script, if given)."""

    def __init__(self, tmp_path, listens, names, args, script=None, env=()):
        self.log_path = tmp_path / f"activated-{len(list(tmp_path.iterdir()))}.log"
        self.log_file, self.script = open(self.log_path, "wb"), script
        command = [sys.executable, "-m", "vtunnel", *map(str, args)]
        if script:
            command = ["sh", "-c", script, "sh", *command]
        self.process = subprocess.Popen(
            ["systemd-socket-activate", *[f"--listen={a}" for a in listens], f"--fdname={':'.join(names)}",
             f"--setenv=PYTHONPATH={ROOT}", *[f"--setenv={e}" for e in env], *command],
            stdout=self.log_file, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_until(lambda: self.log.count("Listening on") == len(listens), what="systemd-socket-activate to listen")

    @property
    def log(self):
        return self.log_path.read_text(errors="replace")

    def vtunnel_pids(self):
        """systemd-socket-activate becomes vtunnel (exec), or the script that runs it as a child."""
        if not self.script:
            return [self.process.pid] if self.process.poll() is None else []
        # (not just "vtunnel": the script's `cat $GATE` may have it in its path, as under the user vtunnel-test)
        found = subprocess.run(["pgrep", "-P", str(self.process.pid), "-f", "python.* -m vtunnel "],
                               capture_output=True, text=True).stdout.split()
        return [int(pid) for pid in found]

    def stop(self):
        for pid in [*self.vtunnel_pids(), self.process.pid]:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log_file.close()


@pytest.fixture
def activations():
    made = []
    yield made
    for activated in made:
        activated.stop()
        print(activated.log)


def in_background(function, *args):
    """Run function(*args) in a thread; returns a list that holds its result (or exception) when done."""
    result = []

    def run():
        try:
            result.append(function(*args))
        except OSError as exc:
            result.append(exc)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_the_peer_takes_its_listeners_from_systemd_by_name_and_by_address(tmp_path, echo, activations):
    """The first client connects before vtunnel runs (systemd-socket-activate starts it on that client)
    and is carried; a TCP socket is matched by its name, a Unix socket by its path; a third matches no
    tunnel and is warned about, once; the port in the config is not opened beside the passed socket."""
    sockets = socket_dir()
    web = tunnel_entry("web", echo.port)
    unix = {**tunnel_entry("sock", echo.port), "peer-socket": f"{sockets}/peer.sock"}
    del unix["peer-address"], unix["peer-port"]
    config = write_config(tmp_path, [web, unix])
    host = Vtunnel("host", "--config-path", config, "--vsock", "tcp:127.0.0.1", log_dir=tmp_path)
    passed, stray = free_port(), free_port()
    peer = Activated(tmp_path, [f"127.0.0.1:{passed}", f"{sockets}/peer.sock", f"127.0.0.1:{stray}"],
                     ["web", "docker", "stray"], ["peer", "--config-path", config, "--vsock", "tcp:127.0.0.1"])
    activations.append(peer)
    try:
        payload = os.urandom(MiB)
        assert sha256(exchange(passed, payload)) == sha256(payload)  # the client that started it
        assert sha256(unix_exchange(f"{sockets}/peer.sock", payload)) == sha256(payload)
        assert echo.received.count((len(payload), sha256(payload))) == 2
        assert refuses(web["peer-port"])
        log = peer.log
        assert f"web: listening on 127.0.0.1:{passed} (passed by systemd)" in log
        assert f"sock: listening on unix://{sockets}/peer.sock (passed by systemd)" in log
        assert log.count("systemd passed a socket that matches no tunnel") == 1
        assert f"matches no tunnel: 127.0.0.1:{stray} (stray)" in log
    finally:
        host.stop()


def test_a_client_that_comes_while_vtunnel_restarts_is_queued_and_carried(tmp_path, echo, activations):
    web = tunnel_entry("web", echo.port)
    config = write_config(tmp_path, [web])
    host = Vtunnel("host", "--config-path", config, "--vsock", "tcp:127.0.0.1", log_dir=tmp_path)
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    passed = free_port()
    peer = Activated(tmp_path, [f"127.0.0.1:{passed}"], ["web"],
                     ["peer", "--config-path", config, "--vsock", "tcp:127.0.0.1"], script=TWICE, env=[f"GATE={gate}"])
    activations.append(peer)
    try:
        assert exchange(passed, b"first") == b"first"
        first = peer.vtunnel_pids()
        assert len(first) == 1
        os.kill(first[0], signal.SIGTERM)
        wait_until(lambda: not peer.vtunnel_pids(), what="the first vtunnel to stop")
        payload = os.urandom(MiB)
        thread, result = in_background(exchange, passed, payload)  # no vtunnel runs: the kernel queues it
        thread.join(1)
        assert thread.is_alive() and not result
        with open(gate, "w"):  # the restart
            pass
        thread.join(60)
        assert result and not isinstance(result[0], Exception) and sha256(result[0]) == sha256(payload)
        assert peer.vtunnel_pids() and peer.vtunnel_pids() != first
    finally:
        host.stop()


def test_a_reload_keeps_a_changed_tunnels_socket_and_closes_a_removed_ones(tmp_path, echo, activations):
    sockets = socket_dir()
    web = tunnel_entry("web", echo.port)
    gone = {**tunnel_entry("gone", echo.port), "peer-socket": f"{sockets}/gone.sock"}
    del gone["peer-address"], gone["peer-port"]
    config = write_config(tmp_path, [web, gone])
    passed = free_port()
    local = Activated(tmp_path, [f"127.0.0.1:{passed}", f"{sockets}/gone.sock"], ["web", "gone"],
                      ["local", "--config-path", config])
    activations.append(local)
    assert exchange(passed, b"before") == b"before"
    write_config(tmp_path, [{**web, "connect-timeout": 7}])  # web changed, gone removed
    os.kill(local.vtunnel_pids()[0], signal.SIGHUP)
    wait_until(lambda: "reload: 0 added, 1 changed (web), 1 removed (gone)" in local.log, what="the reload")
    assert f"gone: removed by the reload: closing the socket systemd passed (unix://{sockets}/gone.sock)" in local.log
    assert local.log.count(f"web: listening on 127.0.0.1:{passed} (passed by systemd)") == 2
    assert exchange(passed, b"after") == b"after"
    assert refuses(web["peer-port"])


def test_sockets_meant_for_another_process_are_left_alone(tmp_path, echo):
    """LISTEN_PID names another process (a parent's sockets leaked to us): vtunnel binds its own."""
    web = tunnel_entry("web", echo.port)
    config = write_config(tmp_path, [web])
    other = socket.create_server(("127.0.0.1", 0))
    os.set_inheritable(other.fileno(), True)

    def as_descriptor_3():
        os.dup2(other.fileno(), 3)
    peer = subprocess.Popen([sys.executable, "-m", "vtunnel", "local", "--config-path", str(config)],
                            env={**os.environ, "LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1",
                                 "LISTEN_FDNAMES": "web"}, preexec_fn=as_descriptor_3, close_fds=False, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: echo_works(web["peer-port"]), what="vtunnel's own listener, carrying")
    finally:
        peer.send_signal(signal.SIGTERM)
        out = peer.communicate(timeout=15)[0].decode()
        other.close()
    assert "systemd passed" not in out


def test_the_metrics_listener_is_taken_by_its_name(tmp_path, echo, activations):
    web = tunnel_entry("web", echo.port)
    config = write_config(tmp_path, [web])
    own, passed = free_port(), free_port()
    local = Activated(tmp_path, [f"127.0.0.1:{passed}"], ["metrics"],
                      ["local", "--config-path", config, "--metrics", f"127.0.0.1:{own}"])
    activations.append(local)
    with urllib.request.urlopen(f"http://127.0.0.1:{passed}/metrics", timeout=30) as answer:  # starts vtunnel
        assert 'vtunnel_tunnel_up{end="peer",tunnel="web"}' in answer.read().decode()
    assert refuses(own)
