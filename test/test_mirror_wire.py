"""vtunnel_mirror on its own: port ranges, the control line both ways, and the kernel's listeners as
sock_diag and /proc/net/tcp each report them (the two must agree)."""

import socket

import pytest

import vtunnel_mirror as mirror


def test_port_ranges_read_and_written():
    assert mirror.parse_ports("3000-3002,5432") == {3000, 3001, 3002, 5432}
    assert mirror.parse_ports(8080) == {8080}
    assert mirror.describe_ports({3000, 3001, 3002, 5432, 22}) == "22,3000-3002,5432"
    for bad in ("3000-2000", "0", "70000", "80,http", "", True, None):
        with pytest.raises(ValueError):
            mirror.parse_ports(bad)


def test_the_control_line_round_trips_and_refuses_anything_else():
    ports = {3000: "127.0.0.1", 9229: "::1", 8080: "0.0.0.0"}
    line = mirror.ports_line(ports)
    assert line == b"PORTS 3000=127.0.0.1,8080=0.0.0.0,9229=::1\n"
    assert mirror.parse_ports_line(line) == ports
    assert mirror.parse_ports_line(mirror.ports_line({})) == {}
    for bad in (b"PORTS 3000=example.com\n", b"PORTS 0=127.0.0.1\n", b"HELLO\n", b"PORTS 3000=127.0.0.1"):
        with pytest.raises(ValueError):
            mirror.parse_ports_line(bad)
    assert mirror.leg_header(5432) == b"VTML\x15\x38"


def test_a_wildcard_service_is_dialled_through_its_familys_loopback():
    assert mirror.dial_address("0.0.0.0") == "127.0.0.1"
    assert mirror.dial_address("::") == "::1"
    assert mirror.dial_address("::1") == "::1"


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_sock_diag_and_proc_agree_on_a_listener_of_ours(host):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6")
    with socket.create_server((host, 0), family=family) as listener:
        port = listener.getsockname()[1]
        ours = {(str(ip), p, inode) for ip, p, inode in mirror._diag_listeners() if p == port}
        assert ours == {(str(ip), p, inode) for ip, p, inode in mirror._proc_listeners() if p == port}
        assert ours and all(ip == host for ip, _, _ in ours)
        assert mirror.listening_ports({port}) == {port: host}
        inode = str(next(iter(ours))[2])
        assert mirror.listening_ports({port}, {inode}) == {}  # a process's own listener is left out
    assert mirror.listening_ports({port}) == {}


def test_without_netlink_the_listeners_come_from_proc(monkeypatch):
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        monkeypatch.delattr(socket, "AF_NETLINK")
        assert mirror.listening_ports({port}) == {port: "127.0.0.1"}
