"""Leg authentication (leg-secret-file) with real vtunnel processes, over the tcp: and unix: transports
and, in the throwaway guest, real AF_VSOCK: the right secret is carried both ways, forward and
reverse; a missing or different secret, a squatter on the peer's port and a loose secret file are
refused, each with a log line that names the cause, and nothing is dialled."""

import contextlib
import os
import re
import socket
import threading
import urllib.request

import pytest
from test_failure_matrix import VSOCK_GUEST

import vtunnel
from helpers import (
    Recording,
    Vtunnel,
    _next_vsock_port,
    echo_server,
    exchange,
    free_port,
    how_it_ended,
    run_vtunnel,
    sha256,
    socket_dir,
    tunnel_entry,
    wait_until,
    write_config,
)

TRANSPORTS = ["tcp", "unix", pytest.param("vsock", marks=[pytest.mark.vsock, VSOCK_GUEST])]
MiB = 1024 * 1024


def write_secret(path, text=None):
    path.write_text(text or os.urandom(32).hex())
    path.chmod(0o600)
    return str(path)


@pytest.mark.parametrize("mode", [*TRANSPORTS, "hybrid"])
def test_the_right_secret_carries_every_byte_forward_and_reverse(deployment, echo, tmp_path, mode):
    secret = write_secret(tmp_path / "leg.secret")
    d = deployment(mode)
    forward = d.add_tunnel("forward", echo.port, **{"leg-secret-file": secret})
    reverse = d.add_reverse("reverse", f"127.0.0.1:{echo.port}", **{"leg-secret-file": secret})
    d.start()
    d.wait_ready()
    payload = os.urandom(8 * MiB)
    assert sha256(exchange(forward["peer-port"], payload)) == sha256(payload)
    port = int(reverse["host-listen-address"].rsplit(":", 1)[1])
    assert sha256(exchange(port, payload)) == sha256(payload)
    assert "refused a leg" not in d.logs() and "leg refused" not in d.logs()


def transport_for(mode):
    """The --vsock value both ends use in `mode`, and how its vsock ports are picked."""
    if mode == "tcp":
        return "tcp:127.0.0.1", free_port
    return (f"unix:{socket_dir()}/v" if mode == "unix" else "vsock:1"), _next_vsock_port


def two_ends(tmp_path, peer_keys, host_keys, upstream_port, mode="tcp", reverse=False, host_options=()):
    """A peer and a host with configs that differ only in `peer_keys` and `host_keys`."""
    transport, vsock_port = transport_for(mode)
    if reverse:
        entry = {"name": "t", "handshake-port": vsock_port(), "vsock-peer-port": vsock_port(),
                 "host-listen-address": f"127.0.0.1:{free_port()}", "upstream-server-address":
                 f"127.0.0.1:{upstream_port}"}
    else:
        entry = tunnel_entry("t", upstream_port, "tcp" if mode == "tcp" else "unix")
    (tmp_path / "peer").mkdir()
    (tmp_path / "host").mkdir()
    peer_config = write_config(tmp_path / "peer", [{**entry, **peer_keys}])
    host_config = write_config(tmp_path / "host", [{**entry, **host_keys}])
    peer = Vtunnel("peer", "--config-path", peer_config, "--vsock", transport, log_dir=tmp_path)
    host = Vtunnel("host", "--config-path", host_config, "--vsock", transport, *host_options, log_dir=tmp_path)
    host.wait_for_log("t: listening on", timeout=60)
    return entry, peer, host


def client_port(entry):
    return entry.get("peer-port") or int(entry["host-listen-address"].rsplit(":", 1)[1])


def refused_at_the_client(port, request=b"a request"):
    """How a client's connection ended: "reset" or "eof" (the tunnel refused it before it was sent)."""
    try:  # the reset may come before connect() has returned to us, or while we send
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(request)
            return how_it_ended(sock)[0]
    except (ConnectionResetError, BrokenPipeError):
        return "reset"


@contextlib.contextmanager
def one_end_with_the_secret(tmp_path, mode, reverse, holder):
    """A tunnel whose `holder` ("dialler" or "acceptor" of the legs) alone has leg-secret-file:
    yields (the client's port, the dialling end, the accepting end, the upstream)."""
    upstream = echo_server()
    keys = {"leg-secret-file": write_secret(tmp_path / "leg.secret")}
    peer_has_it = (holder == "dialler") != reverse  # forward, the peer dials the legs; reverse, the host
    entry, peer, host = two_ends(tmp_path, keys if peer_has_it else {}, {} if peer_has_it else keys,
                                 upstream.port, mode, reverse=reverse)
    try:
        yield client_port(entry), *((host, peer) if reverse else (peer, host)), upstream
    finally:
        peer.stop()
        host.stop()
        upstream.stop()
        print(f"--- peer:\n{peer.log}\n--- host:\n{host.log}")  # shown when the test failed


@pytest.mark.parametrize("mode", TRANSPORTS)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_a_secret_at_the_dialling_end_only_fails_every_leg_and_both_logs_say_why(tmp_path, reverse, mode):
    with one_end_with_the_secret(tmp_path, mode, reverse, "dialler") as (port, dialler, acceptor, _):
        assert refused_at_the_client(port) in ("reset", "eof")
        dialler.wait_for_log("is leg-secret-file set, to the same secret, at both ends?")
        assert "unreachable: leg refused: " in dialler.log
        acceptor.wait_for_log("this end has no leg-secret-file: set it, to the same secret, at both ends")


@pytest.mark.parametrize("mode", TRANSPORTS)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_a_secret_at_the_accepting_end_only_refuses_every_leg_before_the_upstream(tmp_path, reverse, mode):
    with one_end_with_the_secret(tmp_path, mode, reverse, "acceptor") as (port, dialler, acceptor, upstream):
        assert refused_at_the_client(port) in ("reset", "eof")
        acceptor.wait_for_log("refused a leg from")
        assert "the leg did not open with the leg exchange: is leg-secret-file set" in acceptor.log
        wait_until(lambda: "failed (" in dialler.log, what="the dialler's line")
        assert upstream.accepted == 0, "the upstream was never dialled"


@pytest.mark.parametrize("mode", TRANSPORTS)
def test_different_secrets_are_refused_before_the_upstream_and_counted(tmp_path, mode):
    upstream = echo_server()
    metrics = free_port()
    entry, peer, host = two_ends(tmp_path, {"leg-secret-file": write_secret(tmp_path / "a.secret")},
                                 {"leg-secret-file": write_secret(tmp_path / "b.secret")}, upstream.port, mode,
                                 host_options=("--metrics", f"127.0.0.1:{metrics}"))
    try:
        for _ in range(3):
            assert refused_at_the_client(entry["peer-port"]) in ("reset", "eof")
        peer.wait_for_log("leg refused: the other end does not hold this leg secret")
        host.wait_for_log("refused a leg from")  # reset (TCP) or closed (unix:, vsock) by the dialler:
        assert "is leg-secret-file set, to the same secret, at both ends?" in host.log
        assert host.log.count("refused a leg from") == 1  # one line a minute per source and reason
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        assert re.search(r'vtunnel_refused_total\{end="host",reason="no exchange",tunnel="t"\} 3\.0', text), text
        assert upstream.accepted == 0, "the upstream was never dialled"
    finally:
        peer.stop()
        host.stop()
        upstream.stop()
        print(f"--- peer:\n{peer.log}\n--- host:\n{host.log}")  # shown when the test failed


class Squatter(threading.Thread):
    """A VM process that took the peer's vsock port (tcp: here) while the peer was down: it answers
    handshakes with the seed phrase (which is public) and keeps whatever a leg sends it."""

    def __init__(self, handshake_port, leg_port, answer):
        super().__init__(daemon=True)
        self.answer, self.received, self.running = answer, [], True
        self.seed = socket.create_server(("127.0.0.1", handshake_port))
        self.legs = socket.create_server(("127.0.0.1", leg_port))
        for listener in (self.seed, self.legs):
            listener.settimeout(0.1)
        self.start()

    def run(self):
        while self.running:
            for listener in (self.seed, self.legs):
                try:
                    conn, _ = listener.accept()
                except OSError:
                    continue
                with conn:
                    if listener is self.seed:
                        conn.sendall(vtunnel.SEED_PHRASE)
                        continue
                    conn.settimeout(5)
                    got = conn.recv(65536)
                    conn.sendall(self.answer(got))
                    try:
                        while data := conn.recv(65536):
                            got += data
                    except OSError:
                        pass
                    self.received.append(got)

    def stop(self):
        self.running = False
        self.join(5)
        self.seed.close()
        self.legs.close()


@pytest.mark.parametrize("answer", ["garbage", "a recorded answer"])
def test_a_squatter_on_the_peers_port_gets_no_client_byte(tmp_path, answer):
    """Reverse: the host dials the peer's vsock port for each client. Whoever answers there without
    the secret gets the 37-byte hello and not one byte of the client, and the host says so."""
    secret = write_secret(tmp_path / "leg.secret")
    entry = {"name": "t", "handshake-port": free_port(), "vsock-peer-port": free_port(),
             "host-listen-address": f"127.0.0.1:{free_port()}", "upstream-server-address": "127.0.0.1:1",
             "leg-secret-file": secret}
    recorded = b"VTLA\x01" + os.urandom(64)  # the shape of a good answer, from another exchange
    squatter = Squatter(entry["handshake-port"], entry["vsock-peer-port"],
                        lambda hello: b"HTTP/1.0 200 OK\r\n\r\n" if answer == "garbage" else recorded)
    host = Vtunnel("host", "--config-path", write_config(tmp_path, [entry]), "--vsock", "tcp:127.0.0.1",
                   log_dir=tmp_path)
    try:
        host.wait_for_log("t: listening on")
        assert refused_at_the_client(client_port(entry), b"the client's secret bytes" * 100) in ("reset", "eof")
        host.wait_for_log("peer unreachable: leg refused: the other end")
        wait_until(lambda: squatter.received, what="the squatter's leg to end")
        assert all(len(got) == 37 and got.startswith(b"VTLA\x01") for got in squatter.received), squatter.received
    finally:
        host.stop()
        squatter.stop()


def test_a_secret_file_others_can_read_stops_the_start_with_where_and_why(tmp_path):
    secret = tmp_path / "leg.secret"
    write_secret(secret)
    secret.chmod(0o640)
    entry = tunnel_entry("t", 1)
    entry["leg-secret-file"] = str(secret)
    config = write_config(tmp_path, [entry])
    code, out, err = run_vtunnel("check", "--config-path", config)
    assert code == 2 and "Traceback" not in err
    assert re.search(rf"{re.escape(str(config))}:\d+: tunnel 't': key 'leg-secret-file': {re.escape(str(secret))} "
                     r"may be read by others \(mode 0640\): chmod 600", err), err
    secret.chmod(0o600)
    code, out, err = run_vtunnel("check", "--config-path", config)
    assert code == 0 and out.splitlines()[1].split()[-1] == "secret", out


def test_a_recorded_leg_replayed_to_a_running_host_is_refused(tmp_path):
    """tcp: legs admit any local process. One that holds the secret opens a good leg, recorded; the
    recording sent again on a new leg is refused, and the upstream sees only the first."""
    import vtunnel_trust
    upstream = echo_server()
    secret = write_secret(tmp_path / "leg.secret")
    entry, peer, host = two_ends(tmp_path, {"leg-secret-file": secret}, {"leg-secret-file": secret},
                                 upstream.port)
    leg_address = ("127.0.0.1", entry["vsock-host-port"])
    try:
        with socket.create_connection(leg_address, timeout=30) as leg:
            recorded = Recording(leg)
            vtunnel_trust.prove_as_dialler(recorded, vtunnel_trust.LegSecret(secret).key(), entry["vsock-host-port"])
            recorded.sendall(b"a request")
            leg.shutdown(socket.SHUT_WR)
            assert how_it_ended(leg) == ("eof", b"a request")  # echoed: a good leg
        with socket.create_connection(leg_address, timeout=30) as replay:
            replay.sendall(b"".join(recorded.sent))
            assert how_it_ended(replay)[0] in ("reset", "eof")
        host.wait_for_log("refused a leg from 127.0.0.1: the dialler does not hold this leg secret (another "
                          "secret, or a replayed exchange)")
        assert upstream.accepted == 1
    finally:
        peer.stop()
        host.stop()
        upstream.stop()
