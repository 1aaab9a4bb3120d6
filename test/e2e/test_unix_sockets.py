"""Unix-socket ends: a peer that listens on a socket file, upstreams reached by unix:///path.

The ssh-agent tests use the real OpenSSH tools: the shape of "replace socat + npiperelay".
"""

import os
import shutil
import socket
import stat
import subprocess

import pytest

from helpers import (
    MODES,
    Vtunnel,
    echo_server,
    exchange_on,
    half_close_server,
    reply_for,
    run_vtunnel,
    sha256,
    socket_dir,
    tunnel_entry,
    unix_echo_server,
    unix_exchange,
    wait_until,
    write_config,
)


def unix_echo_works(path):
    try:
        return unix_exchange(path, b"ping") == b"ping"
    except OSError:
        return False


@pytest.fixture
def sockets():
    return socket_dir()


@pytest.mark.parametrize("mode", MODES)
def test_ssh_agent_through_the_tunnel(deployment, sockets, tmp_path, mode):
    if not shutil.which("ssh-agent"):
        pytest.skip("needs OpenSSH's ssh-agent, ssh-keygen and ssh-add (Debian: openssh-client)")
    agent_socket = f"{sockets}/agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", agent_socket], stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: os.path.exists(agent_socket), what="ssh-agent's socket")
        key = tmp_path / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "vtunnel-test", "-f", key],
                       check=True)
        d = deployment(mode)
        peer_socket = f"{sockets}/peer-agent.sock"
        d.add_tunnel("agent", upstream=f"unix://{agent_socket}", peer_socket=peer_socket)
        d.start()
        wait_until(lambda: os.path.exists(peer_socket), what="the peer's socket")
        env = {**os.environ, "SSH_AUTH_SOCK": peer_socket}

        def ssh_add(*args):
            return subprocess.run(["ssh-add", *map(str, args)], env=env, capture_output=True, text=True,
                                  timeout=30)
        wait_until(lambda: "The agent has no identities" in ssh_add("-l").stdout, what="ssh-add to reach the agent")
        added = ssh_add(key)
        assert added.returncode == 0, added.stderr
        listed = ssh_add("-l")
        print(f"$ SSH_AUTH_SOCK={peer_socket} ssh-add -l\n{listed.stdout}")
        assert listed.returncode == 0 and "vtunnel-test (ED25519)" in listed.stdout
        fingerprint = subprocess.run(["ssh-keygen", "-lf", key], capture_output=True, text=True).stdout.split()[1]
        assert fingerprint in listed.stdout
    finally:
        agent.terminate()
        agent.wait()


@pytest.mark.parametrize("mode", ["tcp", "unix"])
def test_unix_client_to_tcp_upstream(deployment, sockets, mode):
    upstream = echo_server()
    try:
        d = deployment(mode)
        peer_socket = f"{sockets}/peer.sock"
        d.add_tunnel("u2t", upstream.port, peer_socket=peer_socket)
        d.start()
        wait_until(lambda: unix_echo_works(peer_socket), what="an echo through the peer's socket")
        payload = os.urandom(8 * 1024 * 1024)
        assert sha256(unix_exchange(peer_socket, payload)) == sha256(payload)
        assert (len(payload), sha256(payload)) in upstream.received
    finally:
        upstream.stop()


@pytest.mark.parametrize("mode", ["tcp", "unix"])
def test_tcp_client_to_unix_upstream(deployment, sockets, mode):
    upstream = unix_echo_server(f"{sockets}/upstream.sock")
    try:
        d = deployment(mode)
        entry = d.add_tunnel("t2u", upstream=f"unix://{sockets}/upstream.sock")
        d.start()
        from helpers import echo_works
        wait_until(lambda: echo_works(entry["peer-port"]), what="an echo to the Unix-socket upstream")
        payload = os.urandom(8 * 1024 * 1024)
        with socket.create_connection(("127.0.0.1", entry["peer-port"]), timeout=60) as sock:
            assert sha256(exchange_on(sock, payload)) == sha256(payload)
        assert (len(payload), sha256(payload)) in upstream.received
    finally:
        upstream.stop()


def test_half_close_through_a_unix_peer_socket(deployment, sockets):
    upstream = half_close_server()
    try:
        d = deployment("unix")
        peer_socket = f"{sockets}/peer.sock"
        d.add_tunnel("half", upstream.port, peer_socket=peer_socket)
        d.start()
        request = os.urandom(123_456)

        def attempt():
            try:
                return unix_exchange(peer_socket, request)
            except OSError:
                return None
        assert wait_until(attempt, what="a reply") == reply_for(len(request), sha256(request))
    finally:
        upstream.stop()


def peer_with_socket(tmp_path, sockets, path, mode=None):
    entry = tunnel_entry("s", 1, "unix")
    del entry["peer-address"], entry["peer-port"]
    entry["peer-socket"] = str(path)
    if mode:
        entry["peer-socket-mode"] = mode
    return write_config(tmp_path, [entry]), ["--vsock", f"unix:{sockets}/v"]


@pytest.mark.parametrize("mode,expected", [(None, 0o600), ("0660", 0o660), ("0666", 0o666)])
def test_socket_file_mode_as_configured_and_removed_on_stop(tmp_path, sockets, mode, expected):
    path = f"{sockets}/peer.sock"
    config, transport = peer_with_socket(tmp_path, sockets, path, mode)
    peer = Vtunnel("peer", "--config-path", config, *transport, log_dir=tmp_path)
    try:
        peer.wait_for_log(f"listening on unix://{path}")
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == expected
    finally:
        assert peer.stop() == 0
    assert not os.path.exists(path), "the peer removes its socket file when it stops cleanly"


def test_leftover_socket_file_is_replaced(tmp_path, sockets):
    path = f"{sockets}/peer.sock"
    leftover = socket.socket(socket.AF_UNIX)
    leftover.bind(path)
    leftover.close()  # the file stays, nobody listens: what a crashed peer leaves behind
    config, transport = peer_with_socket(tmp_path, sockets, path)
    peer = Vtunnel("peer", "--config-path", config, *transport, log_dir=tmp_path)
    try:
        peer.wait_for_log(f"listening on unix://{path}")
    finally:
        assert peer.stop() == 0


def test_a_live_socket_is_never_stolen(tmp_path, sockets):
    path = f"{sockets}/peer.sock"
    live = socket.socket(socket.AF_UNIX)
    live.bind(path)
    live.listen(1)
    try:
        config, transport = peer_with_socket(tmp_path, sockets, path)
        code, out, err = run_vtunnel("peer", "--config-path", config, *transport)
        assert code == 1
        assert err.splitlines()[-1] == (f"vtunnel: tunnel 's': cannot listen on unix://{path}: "
                                        "another process is listening on this socket")
        assert os.path.exists(path)
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)  # still the live listener's
        client.close()
    finally:
        live.close()


def test_a_regular_file_in_the_way_is_not_deleted(tmp_path, sockets):
    path = f"{sockets}/peer.sock"
    with open(path, "w") as f:
        f.write("precious")
    config, transport = peer_with_socket(tmp_path, sockets, path)
    code, out, err = run_vtunnel("peer", "--config-path", config, *transport)
    assert code == 1 and "a file that is not a socket is in the way" in err.splitlines()[-1]
    assert open(path).read() == "precious"


def test_a_missing_directory_is_one_line(tmp_path, sockets):
    config, transport = peer_with_socket(tmp_path, sockets, f"{sockets}/nowhere/peer.sock")
    code, out, err = run_vtunnel("peer", "--config-path", config, *transport)
    assert code == 1
    assert err.splitlines()[-1] == (f"vtunnel: tunnel 's': cannot listen on unix://{sockets}/nowhere/peer.sock: "
                                    f"the directory {sockets}/nowhere does not exist")


def test_check_shows_the_new_forms(tmp_path, sockets):
    entry = tunnel_entry("agent", 1, "unix", upstream="unix:///run/user/1000/ssh-agent.sock")
    del entry["peer-address"], entry["peer-port"]
    entry["peer-socket"] = "/tmp/agent.sock"
    code, out, err = run_vtunnel("check", "--config-path", write_config(tmp_path, [entry]))
    assert code == 0, err
    assert "unix:///tmp/agent.sock" in out and "unix:///run/user/1000/ssh-agent.sock" in out
