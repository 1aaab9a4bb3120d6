"""Who may use a leg, in-process over real sockets: the CID check on the accept path of both roles,
the leg exchange (vtunnel_trust) between real sockets, and the refusal log's rate limit. No AF_VSOCK
socket is opened: a VsockTransport object only says which CID it expects; the legs are socket pairs."""

import logging
import os
import socket
import stat

import gevent
import gevent.server
import gevent.socket
import pytest

import vtunnel
import vtunnel_trust
from helpers import Recording
from vtunnel import Host, Peer, Service, Stats, VsockTransport
from vtunnel_trust import LegRefused, LegSecret, LegSecretError, prove_as_acceptor, prove_as_dialler


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "leg.secret"
    path.write_bytes(os.urandom(32).hex().encode() + b"\n")
    path.chmod(0o600)
    return path


class Upstream:
    """A TCP listener that counts the connections it is dialled with."""

    def __init__(self):
        self.dialled = 0
        self.server = gevent.server.StreamServer(("127.0.0.1", 0), self.count)
        self.server.start()

    def count(self, sock, _address):
        self.dialled += 1
        while sock.recv(65536):
            pass


def tunnel_to(upstream_port, reverse=False, secret=None):
    keys = (f"vsock-peer-port: 9, host-listen-address: '127.0.0.1:{upstream_port + 1}'" if reverse
            else "vsock-host-port: 8, peer-address: 127.0.0.1, peer-port: 1")
    secret_key = f", leg-secret-file: '{secret}'" if secret else ""
    return vtunnel.parse_config(f"tunnel:\n- {{name: t, handshake-port: 7, {keys}, connect-timeout: 1, "
                                f"upstream-server-address: '127.0.0.1:{upstream_port}'{secret_key}}}\n")[0]


def open_descriptors():
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("role, reverse", [(Host, False), (Peer, True)], ids=["host", "peer"])
def test_a_leg_from_a_foreign_cid_is_closed_before_anything_is_dialled(role, reverse, caplog):
    """The accept path of the end that dials the upstream: a leg whose peer CID is not the other
    end's is closed at once, counted and logged once a minute per source, with how many."""
    upstream = Upstream()
    tunnel = tunnel_to(upstream.server.server_port, reverse)
    end = role(VsockTransport(cid=2), Service())
    stats = Stats(tunnel.name, end.end, "upstream")
    before = open_descriptors() if os.path.isdir("/proc/self/fd") else None
    for attempt in range(1000):
        leg, far = gevent.socket.socketpair()
        far.settimeout(5)
        refusing = gevent.spawn(end.carry_leg, tunnel, stats, leg, (3, 1024 + attempt))
        assert far.recv(10) == b""  # closed: nothing carried
        far.close()
        refusing.join(5)
    leg, far = gevent.socket.socketpair()
    end.carry_leg(tunnel, stats, leg, (4, 1024))  # another source: a line of its own
    far.close()
    gevent.sleep(0.1)
    assert upstream.dialled == 0
    assert stats.refused == {"foreign cid": 1001}
    refusals = [r.getMessage() for r in caplog.records if "refused a leg" in r.getMessage()]
    assert refusals == ["t: refused a leg from 3: a leg from CID 3, not from CID 2: the "
                        f"{end.other_end} is not there",
                        f"t: refused a leg from 4: a leg from CID 4, not from CID 2: the {end.other_end} is not there"]
    assert "legs refused: foreign cid 1001" in stats.line()
    if before is not None:
        assert open_descriptors() <= before  # nothing kept per refusal


@pytest.mark.parametrize("role, reverse", [(Host, False), (Peer, True)], ids=["host", "peer"])
def test_a_leg_from_the_other_ends_cid_is_carried(role, reverse):
    upstream = Upstream()
    tunnel = tunnel_to(upstream.server.server_port, reverse)
    end = role(VsockTransport(cid=2), Service())
    stats = Stats(tunnel.name, end.end, "upstream")
    leg, far = gevent.socket.socketpair()
    carrying = gevent.spawn(end.carry_leg, tunnel, stats, leg, (2, 1024))
    far.sendall(b"through")
    far.shutdown(socket.SHUT_WR)
    carrying.join(5)
    assert upstream.dialled == 1 and stats.refused == {}


def test_the_refusal_log_says_once_a_minute_how_many():
    refusals = vtunnel_trust.RefusalLog(period=60)
    assert refusals.count("a", "x") == 1
    assert [refusals.count("a", "x") for _ in range(5)] == [None] * 5
    assert refusals.count("b", "x") == 1 and refusals.count("a", "y") == 1
    refusals.last[("a", "x")][0] -= 61
    assert refusals.count("a", "x") == 6  # the five kept quiet and this one


def exchange(dialler_key, acceptor_key, port=8, acceptor_port=None):
    """Run the two halves over a real socket pair: (the dialler's outcome, the acceptor's)."""
    dialler_end, acceptor_end = gevent.socket.socketpair()

    def run(half, sock, key, leg_port):
        try:
            with gevent.Timeout(5):
                half(sock, key, leg_port)
            return "ok"
        except LegRefused as exc:
            sock.close()
            return exc.reason
    acceptor = gevent.spawn(run, prove_as_acceptor, acceptor_end, acceptor_key, acceptor_port or port)
    dialler = run(prove_as_dialler, dialler_end, dialler_key, port)
    return dialler, acceptor.get(timeout=10)


def test_the_same_secret_passes_both_ways_and_a_different_one_fails_both():
    assert exchange(b"k" * 32, b"k" * 32) == ("ok", "ok")
    assert exchange(b"k" * 32, b"j" * 32) == ("wrong secret", "no exchange")  # the dialler stops first
    assert exchange(b"k" * 32, b"k" * 32, port=8, acceptor_port=9) == ("wrong secret", "no exchange")


def test_a_recorded_exchange_replayed_to_the_acceptor_is_refused():
    """A recording of a good dialler's bytes (hello and MAC) fails: the acceptor's nonce is new."""
    key = os.urandom(32)
    dialler_end, acceptor_end = gevent.socket.socketpair()
    acceptor = gevent.spawn(prove_as_acceptor, acceptor_end, key, 8)
    recorded = Recording(dialler_end)
    prove_as_dialler(recorded, key, 8)
    acceptor.get(timeout=5)  # the good exchange passed
    replayer, acceptor_end = gevent.socket.socketpair()
    acceptor = gevent.spawn(prove_as_acceptor, acceptor_end, key, 8)
    replayer.sendall(b"".join(recorded.sent))
    with pytest.raises(LegRefused, match="does not hold this leg secret"):
        acceptor.get(timeout=5)


def test_a_squatter_that_replays_a_recorded_answer_gets_no_byte(caplog):
    """A process on the acceptor's port answers with a recorded acceptor answer: the dialler's nonce
    is new, so the MAC fails and the dialler sends nothing more."""
    key = os.urandom(32)
    dialler_end, acceptor_end = gevent.socket.socketpair()
    recorded = Recording(acceptor_end)
    gevent.spawn(prove_as_acceptor, recorded, key, 8)
    prove_as_dialler(dialler_end, key, 8)
    squatter, dialler_end = gevent.socket.socketpair()
    squatter.sendall(recorded.sent[0])
    with pytest.raises(LegRefused, match="does not hold this leg secret"):
        prove_as_dialler(dialler_end, key, 8)
    dialler_end.close()
    received = squatter.recv(1000)
    assert received.startswith(vtunnel_trust.MAGIC) and len(received) == 37  # its hello, nothing more
    assert squatter.recv(1000) == b""


def test_a_secret_file_others_may_read_is_refused(secret_file):
    secret_file.chmod(0o644)
    with pytest.raises(LegSecretError, match=r"may be read by others \(mode 0644\): chmod 600"):
        LegSecret(str(secret_file))
    secret_file.chmod(0o600)
    secret_file.write_bytes(b"short\n")
    with pytest.raises(LegSecretError, match="holds 5 bytes: expected 16 or more"):
        LegSecret(str(secret_file))


def test_a_changed_secret_file_is_read_again(secret_file):
    secret = LegSecret(str(secret_file))
    first = secret.key()
    secret_file.write_bytes(b"another secret of enough length\n")
    os.utime(secret_file, ns=(1, 1))  # a new mtime, whatever the clock's resolution
    assert secret.key() == b"another secret of enough length" != first
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600


def test_a_leg_with_the_secret_is_carried_and_one_without_is_refused_before_the_upstream(secret_file, caplog):
    caplog.set_level(logging.WARNING)
    upstream = Upstream()
    tunnel = tunnel_to(upstream.server.server_port, secret=secret_file)
    host = Host(vtunnel.TcpTransport("127.0.0.1"), Service())
    stats = Stats(tunnel.name, "host", "upstream")
    leg, far = gevent.socket.socketpair()
    carrying = gevent.spawn(host.carry_leg, tunnel, stats, leg, ("127.0.0.1", 5000))
    prove_as_dialler(far, tunnel.leg_secret.key(), tunnel.leg_port)
    far.sendall(b"payload")
    far.shutdown(socket.SHUT_WR)
    carrying.join(5)
    assert upstream.dialled == 1
    leg, far = gevent.socket.socketpair()
    far.sendall(b"GET / HTTP/1.1\r\n\r\n" + b"x" * 40)  # a client's bytes, as a dialler without the secret sends
    host.carry_leg(tunnel, stats, leg, ("127.0.0.1", 5001))
    gevent.sleep(0.1)
    assert upstream.dialled == 1 and stats.refused == {"no exchange": 1}
    assert "is leg-secret-file set, to the same secret, at both ends?" in caplog.text
    leg, far = gevent.socket.socketpair()  # a dialler that sends nothing: dropped at connect-timeout (1 s)
    host.carry_leg(tunnel, stats, leg, ("127.0.0.1", 5002))
    assert stats.refused == {"no exchange": 1, "timed out": 1} and upstream.dialled == 1


def test_a_unix_transport_leg_socket_admits_its_owner_only(tmp_path):
    """unix: legs: whoever may connect to the socket file reaches the far end, so it is 0600 whatever
    the umask says."""
    transport = vtunnel.UnixTransport(str(tmp_path / "v"))
    old = os.umask(0o002)
    try:
        listener = transport.listen(5)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(tmp_path / "v_5").st_mode) == 0o600
    finally:
        listener.close()
        transport.close_listener(5)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_a_thousand_legs_without_the_secret_leave_no_descriptor_and_one_log_line(secret_file, caplog):
    """Strangers dialling a leg that needs the secret: each refused before the upstream, counted, one
    line for them all, and no descriptor kept."""
    upstream = Upstream()
    tunnel = tunnel_to(upstream.server.server_port, secret=secret_file)
    host = Host(vtunnel.TcpTransport("127.0.0.1"), Service())
    stats = Stats(tunnel.name, "host", "upstream")
    before = open_descriptors()
    for attempt in range(1000):
        leg, stranger = gevent.socket.socketpair()
        stranger.sendall(b"GET / HTTP/1.1\r\n\r\n")  # not the leg exchange
        host.carry_leg(tunnel, stats, leg, ("127.0.0.1", 6000 + attempt))
        stranger.close()
    gevent.sleep(0.1)
    assert open_descriptors() <= before
    assert upstream.dialled == 0 and stats.refused == {"no exchange": 1000}
    assert len([r for r in caplog.records if "refused a leg" in r.getMessage()]) == 1
