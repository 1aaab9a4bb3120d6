"""Transport parsing, port -> address mapping and the Hyper-V service GUIDs."""

import socket
import uuid

import pytest

import vtunnel
from vtunnel import (
    HyperVTransport,
    TcpTransport,
    UnixTransport,
    UsageError,
    VsockTransport,
    hyperv_service_id,
    parse_transport,
)


@pytest.mark.parametrize("port,guid", [
    (0, "00000000-FACB-11E6-BD58-64006A7986D3"),
    (8989, "0000231D-FACB-11E6-BD58-64006A7986D3"),
    (9090, "00002382-FACB-11E6-BD58-64006A7986D3"),
    (0xFFFFFFFF, "FFFFFFFF-FACB-11E6-BD58-64006A7986D3"),
])
def test_hyperv_service_id_is_the_vsock_template(port, guid):
    assert hyperv_service_id(port) == guid
    assert uuid.UUID(guid).fields[0] == port  # the port is the GUID's first field


def test_parse_transport():
    assert isinstance(parse_transport("vsock"), VsockTransport)
    assert parse_transport("vsock").dial_address(8989) == (vtunnel.VMADDR_CID_HOST, 8989)
    assert parse_transport("vsock:1").dial_address(5) == (1, 5)
    assert parse_transport("vsock").listen_address(5) == (0xFFFFFFFF, 5)
    assert parse_transport("tcp:127.0.0.1").dial_address(8989) == ("127.0.0.1", 8989)
    assert parse_transport("tcp:[::1]").family == socket.AF_INET6
    assert parse_transport("unix:/run/vt").dial_address(9090) == "/run/vt_9090"
    hybrid = parse_transport("hybrid:/srv/fc/v.sock")  # dialled through the VMM's socket, listened as unix:
    assert str(hybrid) == "hybrid:/srv/fc/v.sock" and hybrid.listen_address(9091) == "/srv/fc/v.sock_9091"
    hyperv = parse_transport("hyperv")
    assert isinstance(hyperv, HyperVTransport)
    hyperv.vm_id = "D7F8B0B2-0D4B-4B36-A6F4-4C1A9A3D2E11"
    assert hyperv.listen_address(8989) == (hyperv.vm_id, "0000231D-FACB-11E6-BD58-64006A7986D3")


@pytest.mark.parametrize("spec", ["", "vsock:x", "tcp:", "tcp:localhost", "unix:", "hyperv:1", "pipe:x"])
def test_bad_transports(spec):
    with pytest.raises(UsageError, match="--vsock"):
        parse_transport(spec)


def test_tcp_transport_rejects_vsock_ports_beyond_65535():
    tunnel = vtunnel.parse_config(
        "tunnel:\n- {name: a, handshake-port: 70000, vsock-host-port: 1, peer-address: 127.0.0.1,"
        " peer-port: 1, upstream-server-address: '127.0.0.1:1'}\n")
    with pytest.raises(UsageError, match="vsock port 70000 does not fit the tcp:127.0.0.1 transport"):
        vtunnel.check_transport(tunnel, TcpTransport("127.0.0.1"))


def test_unix_transport_replaces_a_stale_socket_and_refuses_a_live_one(tmp_path):
    transport = UnixTransport(str(tmp_path / "v"))
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(transport.listen_address(7))
    stale.close()  # file left behind, nobody listening
    live = transport.listen(7)
    try:
        with pytest.raises(OSError, match="another process is listening"):
            transport.listen(7)
    finally:
        live.close()
        transport.close_listener(7)
    assert not (tmp_path / "v_7").exists()


def test_debug_lines_name_every_kind_of_socket_address():
    """AF_VSOCK's addresses are (cid, port), with an int where TCP has a host: the debug line of every
    real-vsock connection once raised TypeError here, and the connection ended as a clean close."""
    assert vtunnel._address((2, 1234)) == "2:1234"
    assert vtunnel._address(("::1", 80, 0, 0)) == "[::1]:80"
    assert vtunnel._address("/run/a.sock") == "/run/a.sock" and vtunnel._address("") == "unnamed"


TUNING = {"TCP_NODELAY": (socket.IPPROTO_TCP, 1), "SO_KEEPALIVE": (socket.SOL_SOCKET, 1),
          **{name: (socket.IPPROTO_TCP, value) for name, value in vtunnel.KEEPALIVE.items()}}


def tuning(sock):
    return {name: sock.getsockopt(level, getattr(socket, name)) for name, (level, _) in TUNING.items()}


@pytest.mark.parametrize("listen", [lambda port: vtunnel.listen_tcp("127.0.0.1", port),
                                    lambda port: TcpTransport("127.0.0.1").listen(port)],
                         ids=["tunnel listener", "tcp: transport listener"])
def test_every_accepted_tcp_connection_is_tuned_by_its_listener(listen):
    """vtunnel sets no option on an accepted TCP connection (five system calls saved per
    connection): it relies on the kernel copying the listener's at accept."""
    listener = listen(0)
    try:
        with socket.create_connection(listener.getsockname(), timeout=5):
            accepted, _ = listener.accept()
            with accepted:
                assert tuning(accepted) == {name: value for name, (_, value) in TUNING.items()}
    finally:
        listener.close()


def test_a_dialled_connection_skips_keepalive_only_to_loopback():
    with socket.create_server(("127.0.0.1", 0)) as server:
        with vtunnel.connect_tcp("127.0.0.1", server.getsockname()[1], timeout=5) as dialled:
            assert tuning(dialled)["TCP_NODELAY"] == 1
            assert tuning(dialled)["SO_KEEPALIVE"] == 0  # a loopback peer never vanishes unseen
    with socket.socket() as elsewhere:  # tuned as a dial to another machine would be
        vtunnel.tune_tcp(elsewhere, keepalive=not vtunnel.is_loopback("192.0.2.1"))
        assert tuning(elsewhere) == {name: value for name, (_, value) in TUNING.items()}
