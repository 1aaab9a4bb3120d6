"""Config validation: every error names the file, the line, the tunnel and the key."""

import re
import textwrap

import pytest

import vtunnel
from helpers import ROOT
from vtunnel import ConfigError, PipeEndpoint, TcpEndpoint, parse_config, parse_upstream

GOOD = """\
tunnel:
  - name: tcpTunnel
    handshake-port: 9090
    vsock-host-port: 8989
    peer-address: 127.0.0.1
    peer-port: 3030
    upstream-server-address: 127.0.0.1:4444
  - name: npipeTunnel
    handshake-port: 9091
    vsock-host-port: 8990
    peer-address: 127.0.0.1
    peer-port: 4040
    upstream-server-address: npipe:////./pipe/my-upstream-server
"""


def errors_of(text):
    with pytest.raises(ConfigError) as caught:
        parse_config(textwrap.dedent(text), "c.yaml")
    return caught.value.errors


def one_error(text):
    errors = errors_of(text)
    assert len(errors) == 1, errors
    return errors[0]


FIRST = {key: value for key, value in
         (line.strip().lstrip("- ").split(": ", 1) for line in GOOD.splitlines()[1:7])}


def with_key(key, value):
    """GOOD's first tunnel with `key` set to `value` (None: removed), written on line 3."""
    keys = {key: value, **{k: v for k, v in FIRST.items() if k != key}}
    return "tunnel:\n  -\n" + "".join(f"    {k}: {v}\n" for k, v in keys.items() if v is not None)


def test_the_go_vtunnel_readme_config_loads():
    tcp, pipe = parse_config(GOOD, "c.yaml")
    assert (tcp.name, tcp.handshake_port, tcp.vsock_host_port, tcp.peer) == \
        ("tcpTunnel", 9090, 8989, TcpEndpoint("127.0.0.1", 3030))
    assert (tcp.max_connections, tcp.connect_timeout, tcp.idle_timeout) == (None, 10.0, None)
    assert tcp.upstream == TcpEndpoint("127.0.0.1", 4444)
    assert pipe.upstream == PipeEndpoint(r"\\.\pipe\my-upstream-server")
    assert str(pipe.upstream) == "npipe:////./pipe/my-upstream-server"


GO_E2E = """\
tunnel:
    - name: ""
      handshake-port: 9090
      vsock-host-port: 8989
      peer-address: 127.0.0.1
      peer-port: 3030
      upstream-server-address: 127.0.0.1:50123
    - name: ""
      handshake-port: 9091
      vsock-host-port: 9999
      peer-address: 127.0.0.1
      peer-port: 4040
      upstream-server-address: 127.0.0.1:50124
"""


def test_a_config_written_by_the_go_vtunnels_own_test_loads_with_generated_names():
    """Its e2e test marshals config.Tunnel with yaml.v3 and never sets a name (the Go program ignores it)."""
    first, second = parse_config(GO_E2E, "c.yaml")
    assert (first.name, first.handshake_port, first.peer) == ("tunnel-1", 9090, TcpEndpoint("127.0.0.1", 3030))
    assert (second.name, second.upstream) == ("tunnel-2", TcpEndpoint("127.0.0.1", 50124))
    without = GO_E2E.replace('    - name: ""\n      handshake-port: 9091', "    - handshake-port: 9091")
    assert [t.name for t in parse_config(without, "c.yaml")] == ["tunnel-1", "tunnel-2"]


def test_every_problem_of_a_file_is_told_at_once():
    """A duplicate YAML key, a bad value, an unknown key and a port used twice: all four at once."""
    text = (
        "tunnel:\n"
        "    - name: ''\n"
        "      handshake-port: 9090\n"
        "      vsock-host-port: 8989\n"
        "      vsock-host-port: 1\n"
        "      peer-address: 127.0.0.1\n"
        "      peer-port: 99999\n"
        "      upstream-server-address: 127.0.0.1:50123\n"
        "      colour: red\n"
        "    - handshake-port: 9091\n"
        "      vsock-host-port: 9999\n"
        "      peer-address: 127.0.0.1\n"
        "      peer-port: 4040\n"
        "      upstream-server-address: 127.0.0.1:50124\n"
        "    - name: third\n"
        "      handshake-port: 9091\n"
        "      vsock-host-port: 9998\n"
        "      peer-address: 127.0.0.1\n"
        "      peer-port: 4041\n"
        "      upstream-server-address: 127.0.0.1:50125\n"
    )
    assert errors_of(text) == [
        "c.yaml:5: not valid YAML: key 'vsock-host-port' appears twice (first on line 4)",
        "c.yaml:7: tunnel 'tunnel-1': key 'peer-port': expected a TCP port from 1 to 65535, got 99999",
        "c.yaml:9: tunnel 'tunnel-1': unknown key 'colour': expected one of " + ", ".join(vtunnel.KEYS),
        "c.yaml:15: tunnel 'third': handshake-port 9091 is already used by tunnel 'tunnel-2' (line 10)",
    ]


def test_the_shipped_config_is_valid():
    tunnels = vtunnel.load_config(ROOT / "config.yaml")
    assert tunnels and all(t.peer.is_loopback for t in tunnels)


REQUIRED_KEYS = [k for k, (_, _, default) in vtunnel.KEYS.items() if default is vtunnel.REQUIRED]


@pytest.mark.parametrize("key", REQUIRED_KEYS + ["peer-address", "peer-port"])
def test_missing_key(key):
    error = one_error(with_key(key, None))
    assert error.startswith("c.yaml:3: tunnel") and f"missing key '{key}'" in error


def test_unknown_key_names_its_line():
    error = one_error(with_key("colour", "blue"))
    assert error.startswith("c.yaml:3: tunnel 'tcpTunnel': unknown key 'colour'")


@pytest.mark.parametrize("key,value,expected", [
    ("peer-port", 0, "expected a TCP port from 1 to 65535, got 0"),
    ("peer-port", 65536, "expected a TCP port from 1 to 65535, got 65536"),
    ("peer-port", '"3030"', "expected an integer, got str '3030'"),
    ("peer-port", "true", "expected an integer, got bool True"),
    ("peer-port", 3.5, "expected an integer, got float 3.5"),
    ("handshake-port", -1, "expected a vsock port from 0 to 4294967295, got -1"),
    ("vsock-host-port", 4294967296, "expected a vsock port from 0 to 4294967295, got 4294967296"),
    ("vsock-host-port", "[1, 2]", "expected an integer, got a list"),
    ("peer-address", '""', "expected a non-empty string"),
    ("peer-address", "not_an:address", "expected an IP address or a host name"),
    ("peer-address", "999.1.1.1", "expected an IP address or a host name, got '999.1.1.1', which is neither"),
    ("upstream-server-address", "10.0.0.256:80", "expected an IP address or a host name, got '10.0.0.256', which"),
    ("upstream-server-address", "127.0.0.1", "expected HOST:PORT, got '127.0.0.1'"),
    ("upstream-server-address", "127.0.0.1:0", "expected a TCP port from 1 to 65535 after the colon"),
    ("upstream-server-address", "127.0.0.1:http", "expected a TCP port from 1 to 65535 after the colon"),
    ("upstream-server-address", "::1:80", "an IPv6 address needs brackets: [::1]:80"),
    ("upstream-server-address", "'[example.com]:80'", "expected an IPv6 address inside [ ]"),
    ("upstream-server-address", "npipe://pipe", "expected npipe:////./pipe/NAME"),
    ("upstream-server-address", "http://x:1", "expected HOST:PORT, [IPv6]:PORT, unix:///PATH or npipe:////./pipe/NAME"),
    ("upstream-server-address", "{a: 1}", "expected a non-empty string, got a mapping"),
    ("name", "[a]", "expected a non-empty string, got a list"),
])
def test_bad_values_name_key_line_and_expectation(key, value, expected):
    error = one_error(with_key(key, value))
    assert error.startswith("c.yaml:3: tunnel ") and f"key '{key}': {expected}" in error


@pytest.mark.parametrize("address,host,port", [
    ("127.0.0.1:4444", "127.0.0.1", 4444),
    ("[::1]:8080", "::1", 8080),
    ("localhost:80", "localhost", 80),
    ("docker.internal:2375", "docker.internal", 2375),
])
def test_upstream_addresses(address, host, port):
    upstream = parse_upstream(address)
    assert upstream == TcpEndpoint(host, port)
    assert str(upstream) == address


def test_duplicate_names_and_ports_are_reported_with_both_lines():
    text = GOOD.replace("npipeTunnel", "tcpTunnel").replace("9091", "8989").replace("4040", "3030")
    errors = errors_of(text)
    assert "c.yaml:8: tunnel 'tcpTunnel': name 'tcpTunnel' is already used by tunnel 'tcpTunnel' (line 2)" in errors
    assert any("handshake-port 8989 is already used" in e for e in errors)
    assert any("peer-port 3030 is already used" in e for e in errors)


def test_a_clash_is_reported_beside_the_other_problems_of_the_same_entry():
    """Every problem at once: the second entry has a bad key and also clashes with the first; both
    are told in one go, not the clash after the bad key is fixed (issue 28)."""
    text = GOOD.replace("npipeTunnel", "tcpTunnel").replace("9091", "9090").replace(
        "    upstream-server-address: npipe:////./pipe/my-upstream-server", "    idle-timeout: soon")
    errors = errors_of(text)
    assert any("key 'idle-timeout'" in e for e in errors), errors
    assert any("missing key 'upstream-server-address'" in e for e in errors), errors
    assert "c.yaml:8: tunnel 'tcpTunnel': name 'tcpTunnel' is already used by tunnel 'tcpTunnel' (line 2)" in errors
    assert "c.yaml:8: tunnel 'tcpTunnel': handshake-port 9090 is already used by tunnel 'tcpTunnel' (line 2)" in errors


def test_peer_socket_mode_beside_a_tcp_peer_says_what_it_goes_with():
    error = one_error(GOOD.replace("    peer-port: 3030\n", "    peer-port: 3030\n    peer-socket-mode: '0660'\n", 1))
    assert error == ("c.yaml:2: tunnel 'tcpTunnel': peer-socket-mode goes with peer-socket, not with peer-address "
                     "and peer-port")


def test_handshake_and_host_port_of_one_tunnel_must_differ():
    error = one_error(with_key("vsock-host-port", 9090))
    assert "vsock-host-port 9090 is already used by tunnel 'tcpTunnel'" in error


@pytest.mark.parametrize("text,expected", [
    ("", "c.yaml:1: expected a mapping with a 'tunnel:' list, got nothing"),
    ("- 1\n", "c.yaml:1: expected a mapping with a 'tunnel:' list, got a list"),
    ("tunnel:\n", "c.yaml:1: key 'tunnel': expected a non-empty list of tunnels, got nothing"),
    ("tunnel: []\n", "c.yaml:1: key 'tunnel': expected a non-empty list of tunnels, got an empty list"),
    ("tunnel: {name: x}\n", "c.yaml:1: key 'tunnel': expected a non-empty list of tunnels, got a mapping"),
    ("tunnel:\n  - 42\n", "c.yaml:2: tunnel #1: expected a mapping of tunnel keys, got int 42"),
    ("tunnel: [\n", "c.yaml:2: not valid YAML"),
    ("tunnel: []\ntunnel: []\n", "c.yaml:2: not valid YAML: key 'tunnel' appears twice"),
    ("tunnels: []\n", "c.yaml:1: unknown key 'tunnels': expected 'tunnel'"),
])
def test_bad_documents(text, expected):
    assert any(e.startswith(expected) for e in errors_of(text)), errors_of(text)


def test_every_error_is_reported_at_once():
    text = with_key("peer-port", 0).replace("9090", "-5")
    assert len(errors_of(text)) == 2


def test_only_loopback_peer_addresses_count_as_loopback():
    assert vtunnel.is_loopback("127.0.0.1") and vtunnel.is_loopback("::1") and vtunnel.is_loopback("localhost")
    assert not vtunnel.is_loopback("0.0.0.0") and not vtunnel.is_loopback("192.0.2.1")


def unix_tunnel(**keys):
    base = {"name": "agent", "handshake-port": 1, "vsock-host-port": 2,
            "upstream-server-address": "npipe:////./pipe/openssh-ssh-agent"}
    base.update(keys)
    return "tunnel:\n  -\n" + "".join(f"    {k}: {v}\n" for k, v in base.items())


def test_peer_socket_with_default_and_explicit_mode():
    (tunnel,) = parse_config(unix_tunnel(**{"peer-socket": "/tmp/a.sock"}))
    assert tunnel.peer == vtunnel.UnixEndpoint("/tmp/a.sock", 0o600)
    (tunnel,) = parse_config(unix_tunnel(**{"peer-socket": "/tmp/a.sock", "peer-socket-mode": '"0660"'}))
    assert tunnel.peer.mode == 0o660


@pytest.mark.parametrize("keys,expected", [
    ({"peer-socket": "/tmp/a.sock", "peer-port": 1}, "give either peer-address and peer-port, or peer-socket, "
                                                     "not both (found peer-port, peer-socket)"),
    ({}, "missing key 'peer-address' and 'peer-port' (or give 'peer-socket' instead)"),
    ({"peer-socket-mode": '"0600"'}, "peer-socket-mode goes with peer-socket, which is missing"),
    ({"peer-socket": "relative.sock"}, "key 'peer-socket': expected an absolute path, got 'relative.sock'"),
    ({"peer-socket": "/" + "x" * 120}, "key 'peer-socket': a Unix socket path holds at most 107 bytes"),
    ({"peer-socket": "/tmp/a", "peer-socket-mode": "0600"}, 'expected an octal string such as "0600", got int 384'),
    ({"peer-socket": "/tmp/a", "peer-socket-mode": '"rw"'}, 'expected an octal string such as "0600", got str'),
    ({"peer-socket": "/tmp/a", "upstream-server-address": "unix://relative"}, "expected unix:///PATH"),
])
def test_peer_socket_errors_name_the_tunnel(keys, expected):
    error = one_error(unix_tunnel(**keys))
    assert re.match(r"c.yaml:\d+: tunnel 'agent': ", error) and expected in error, error


def test_unix_upstream():
    (tunnel,) = parse_config(unix_tunnel(**{"peer-socket": "/tmp/a",
                                            "upstream-server-address": "unix:///var/run/docker.sock"}))
    assert tunnel.upstream == vtunnel.UnixEndpoint("/var/run/docker.sock")
    assert str(tunnel.upstream) == "unix:///var/run/docker.sock"


def test_two_tunnels_on_one_peer_socket():
    text = GOOD.replace("    peer-address: 127.0.0.1\n    peer-port: 3030\n", "    peer-socket: /tmp/x.sock\n") \
               .replace("    peer-address: 127.0.0.1\n    peer-port: 4040\n", "    peer-socket: /tmp/x.sock\n")
    assert "peer-socket /tmp/x.sock is already used by tunnel 'tcpTunnel'" in one_error(text)


REVERSE = """\
tunnel:
  - name: vm-web
    handshake-port: 9290
    vsock-peer-port: 9291
    host-listen-address: {listen}
    upstream-server-address: {upstream}
{extra}"""


def reverse(listen="127.0.0.1:8080", upstream="127.0.0.1:80", extra=""):
    return REVERSE.format(listen=listen, upstream=upstream, extra=extra)


def test_a_reverse_tunnel_loads_beside_a_forward_one():
    forward, back = parse_config(GOOD.split("  - name: npipeTunnel")[0] + reverse().split("tunnel:\n")[1], "c.yaml")
    assert not forward.reverse and (forward.leg_port, forward.clients_at) == (8989, TcpEndpoint("127.0.0.1", 3030))
    assert back.reverse and (back.vsock_peer_port, back.leg_port, back.vsock_host_port, back.peer) == (9291, 9291,
                                                                                                    None, None)
    assert back.host_listen == TcpEndpoint("127.0.0.1", 8080) and back.upstream == TcpEndpoint("127.0.0.1", 80)
    sock = parse_config(reverse("unix:///run/vm-web.sock", extra='    host-socket-mode: "0660"\n'))[0]
    assert sock.host_listen == vtunnel.UnixEndpoint("/run/vm-web.sock", 0o660)
    assert parse_config(reverse("unix:///run/w.sock"))[0].host_listen.mode == 0o600


@pytest.mark.parametrize("text,expected", [
    (reverse(extra="    peer-port: 3030\n"),
     "c.yaml:2: tunnel 'vm-web': a reverse tunnel (it has vsock-peer-port, host-listen-address) takes none of "
     "the forward keys (found peer-port)"),
    (reverse(extra="    vsock-host-port: 1\n"), "takes none of the forward keys (found vsock-host-port)"),
    (reverse().replace("    vsock-peer-port: 9291\n", ""),
     "c.yaml:2: tunnel 'vm-web': missing key 'vsock-peer-port' (a reverse tunnel needs it)"),
    (reverse().replace("    host-listen-address: 127.0.0.1:8080\n", ""),
     "c.yaml:2: tunnel 'vm-web': missing key 'host-listen-address' (a reverse tunnel needs it)"),
    (reverse(upstream="npipe:////./pipe/x"),
     "c.yaml:6: tunnel 'vm-web': key 'upstream-server-address': a reverse tunnel's upstream is inside the VM: "
     "expected IP:port or unix:///path, not npipe://"),
    (reverse(extra='    host-socket-mode: "0660"\n'),
     "c.yaml:7: tunnel 'vm-web': host-socket-mode goes with a unix:/// host-listen-address"),
    (reverse(listen="nowhere"), "c.yaml:5: tunnel 'vm-web': key 'host-listen-address': "),
    (reverse() + "  - name: other\n    handshake-port: 7\n    vsock-host-port: 9291\n    peer-port: 1\n"
     "    peer-address: 127.0.0.1\n    upstream-server-address: 127.0.0.1:1\n",
     "c.yaml:7: tunnel 'other': vsock-host-port 9291 is already used by tunnel 'vm-web' (line 2)"),
    (reverse() + reverse().split("tunnel:\n")[1].replace("vm-web", "twin").replace("929", "939"),
     "c.yaml:7: tunnel 'twin': host-listen-address 127.0.0.1:8080 is already used by tunnel 'vm-web' (line 2)"),
])
def test_reverse_tunnel_errors(text, expected):
    assert expected in one_error(text)


def test_host_pipe_sddl_goes_with_a_pipe_listener():
    sddl = "D:P(A;;GA;;;SY)(A;;GA;;;OW)(A;;0x12019b;;;AU)"
    assert parse_config(reverse("npipe:////./pipe/docker_engine", extra=f'    host-pipe-sddl: "{sddl}"\n'))[
        0].host_listen == PipeEndpoint(r"\\.\pipe\docker_engine", sddl)
    assert one_error(reverse(extra=f'    host-pipe-sddl: "{sddl}"\n')) == \
        "c.yaml:7: tunnel 'vm-web': host-pipe-sddl goes with an npipe:// host-listen-address"


@pytest.mark.parametrize("sddl", ["D:P(A;;GA;;;AU)", "D:P(A;;GRGW;;;WD)", "D:P(A;;0x12019f;;;AU)",
                                  "D:P(A;;GA;;;SY)(A;;WD;;;BU)"])
def test_an_sddl_that_lets_others_serve_the_pipe_or_rewrite_its_dacl_is_refused(sddl):
    """Create-instance (0x4, in GA, GW, FW...) lets its holder serve the name and read other clients'
    requests; WRITE_DAC lets it rewrite who may: for the owner, SYSTEM and the administrators only."""
    problem = one_error(reverse("npipe:////./pipe/docker_engine", extra=f'    host-pipe-sddl: "{sddl}"\n'))
    assert "lets it create instances of the pipe" in problem and "0x12019b" in problem


def test_every_path_key_expands_a_leading_tilde(monkeypatch, tmp_path):
    """As the README says: peer-socket, a unix:// address and leg-secret-file take ~ for the home directory."""
    monkeypatch.setenv("HOME", str(tmp_path))
    secret = tmp_path / "leg.secret"
    secret.write_text("s" * 32)
    secret.chmod(0o600)
    tunnel = parse_config(textwrap.dedent("""\
        tunnel:
          - name: t
            handshake-port: 1
            vsock-host-port: 2
            peer-socket: ~/agent.sock
            upstream-server-address: unix://~/upstream.sock
            leg-secret-file: ~/leg.secret
        """), "c.yaml")[0]
    assert tunnel.peer.path == f"{tmp_path}/agent.sock"
    assert tunnel.upstream.path == f"{tmp_path}/upstream.sock"
    assert tunnel.leg_secret.path == str(secret)
