"""Mirrored ports (mirror-ports): each TCP listener the peer's machine has on the entry's ports appears
on the host, at the VM port + host-port-offset, and goes when it goes. Peer and host run on one machine
here, so each test mirrors only the ports of its own "VM" services, and an offset puts the host's
listeners where nothing else is (and outside the mirrored ports: no loop)."""

import os
import random
import signal
import socket
import threading
import urllib.request

import pytest
from test_failure_matrix import IN_GUEST

from helpers import (
    HttpServer,
    Vtunnel,
    _handed_out,
    _next_vsock_port,
    _worker_range,
    echo_server,
    echo_works,
    exchange,
    free_port,
    half_close_server,
    how_it_ended,
    refuses,
    reply_for,
    run_vtunnel,
    sha256,
    wait_until,
    write_config,
)

MODES = ["tcp", "unix", "local", "hybrid", pytest.param("vsock", marks=IN_GUEST)]
MiB = 1024 * 1024


def free_block(count):
    """`count` consecutive ports, free on loopback, in this worker's range below the ephemeral ones
    (helpers.free_port's reasons: an outgoing connection may take an ephemeral port before a listener)."""
    low, high = _worker_range()
    for _ in range(500):
        base = random.randrange(low, high - count)
        block = range(base, base + count)
        if any(port in _handed_out for port in block):
            continue
        probes = []
        try:
            for port in block:
                probes.append(socket.create_server(("127.0.0.1", port)))
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
        _handed_out.update(block)
        return list(block)
    raise RuntimeError(f"no {count} free consecutive ports")


def free_offset(ports):
    """An offset that puts every port of `ports` on a free port of this worker's range, none of them
    among `ports` (mirrored, they would be mirrored again)."""
    low, high = _worker_range()
    consecutive = ports == list(range(ports[0], ports[0] + len(ports)))
    for _ in range(200):
        if consecutive:
            offset = free_block(len(ports))[0] - ports[0]
        else:
            offset = free_block(1)[0] - ports[0]
            rest = [p + offset for p in ports[1:]]
            if not all(low <= port < high and port not in _handed_out and _bindable(port) for port in rest):
                continue
            _handed_out.update(rest)
        if not {p + offset for p in ports} & set(ports):
            return offset
    raise RuntimeError("no free offset")


def _bindable(port):
    try:
        socket.create_server(("127.0.0.1", port)).close()
    except OSError:
        return False
    return True


def mirror_entry(d, ports, offset, **keys):
    """A mirror entry in deployment `d` for `ports` (a list of ints, or a string of ranges)."""
    vsock_port = free_port if d.mode in ("tcp", "local") else _next_vsock_port
    text = ports if isinstance(ports, str) else ",".join(map(str, ports))
    entry = {"name": "vm-ports", "handshake-port": vsock_port(), "vsock-peer-port": vsock_port(),
             "mirror-ports": text, "host-listen-address": "127.0.0.1", "host-port-offset": offset, **keys}
    d.tunnels.append(entry)
    d.config = write_config(d.tmp_path, d.tunnels)
    return entry


def host_log(d):
    return (d.local or d.host).log


def vm_echo(host="127.0.0.1", port=None):
    """A TCP echo service "in the VM" on `host` (127.0.0.1, ::1, 0.0.0.0 or ::), on a port of this
    worker's range."""
    return echo_server(port or free_block(1)[0], host)


@pytest.mark.parametrize("mode", MODES)
def test_a_vm_service_appears_on_the_host_carries_every_byte_and_goes_when_it_stops(deployment, mode):
    vm = vm_echo()
    excluded = vm_echo()
    offset = free_offset([vm.port, excluded.port])
    d = deployment(mode)
    mirror_entry(d, [vm.port, excluded.port], offset, **{"exclude-ports": str(excluded.port)})
    d.start()
    host_port = vm.port + offset
    wait_until(lambda: echo_works(host_port), what="the VM's port on the host")
    payload = os.urandom(32 * MiB)
    assert sha256(exchange(host_port, payload)) == sha256(payload)
    log = host_log(d)
    assert f"vm-ports: VM port {vm.port} (127.0.0.1) mirrored: listening on 127.0.0.1:{host_port}" in log
    assert f"VM port {excluded.port} " not in log and refuses(excluded.port + offset)  # excluded: never there
    vm.stop()
    wait_until(lambda: refuses(host_port), what="the host's listener to go")
    wait_until(lambda: f"vm-ports: VM port {vm.port} is gone: no longer listening on 127.0.0.1:{host_port}"
               in host_log(d), what="the line saying so")
    excluded.stop()


@pytest.mark.parametrize("mode", ["tcp", "unix"])
def test_fifty_ports_at_once_and_one_the_host_cannot_bind(deployment, mode):
    services = [vm_echo(port=port) for port in free_block(50)]
    ports = [s.port for s in services]
    offset = free_offset(ports)
    squatter = socket.create_server(("127.0.0.1", ports[7] + offset))  # taken on the host
    d = deployment(mode)
    mirror_entry(d, ports, offset)
    d.start()
    try:
        wait_until(lambda: all(echo_works(p + offset) for i, p in enumerate(ports) if i != 7), timeout=30,
                   what="49 ports on the host")
        results = {}

        def one(i):
            payload = os.urandom(random.choice([1, 4096, 300_000]))
            results[i] = exchange(ports[i] + offset, payload) == payload
        threads = [threading.Thread(target=one, args=(i,)) for i in range(50) if i != 7]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(results.values()) and len(results) == 49
        d.host.wait_for_log(f"vm-ports: VM port {ports[7]} (127.0.0.1) cannot be mirrored: tunnel 'vm-ports': "
                            f"cannot listen on 127.0.0.1:{ports[7] + offset}: address already in use; trying again")
        squatter.close()  # tried again at the next report or within 10 s
        wait_until(lambda: echo_works(ports[7] + offset), timeout=30, what="the port once it is free")
    finally:
        squatter.close()
        for s in services:
            s.stop()


@pytest.mark.parametrize("address", ["::1", "0.0.0.0", "::"])
def test_ipv6_only_and_wildcard_services_are_dialled_where_they_listen(deployment, address):
    if ":" in address and not socket.has_ipv6:
        pytest.skip("no IPv6")
    vm = vm_echo(address)
    offset = free_offset([vm.port])
    d = deployment("tcp")
    mirror_entry(d, [vm.port], offset)
    d.start()
    wait_until(lambda: echo_works(vm.port + offset), what="the VM's port on the host")
    assert f"VM port {vm.port} ({address}) mirrored" in d.host.log
    vm.stop()


def test_half_close_and_a_reset_travel_through_a_mirrored_port(deployment):
    upstream = half_close_server()  # answers after the client's end of stream
    offset = free_offset([upstream.port])
    d = deployment("tcp")
    mirror_entry(d, [upstream.port], offset)
    d.start()
    port = upstream.port + offset
    wait_until(lambda: not refuses(port), what="the mirrored port")
    request = os.urandom(2 * MiB)
    wait_until(lambda: _asks(port, request), what="a whole reply after the half-close")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.sendall(b"x" * 1000)
    d.peer.wait_for_log("failed (")  # the client's reset reached the VM's side as a failure
    upstream.stop()


def _asks(port, request):
    try:
        return exchange(port, request, timeout=10) == reply_for(len(request), sha256(request))
    except OSError:
        return False


@pytest.mark.parametrize("restarted", ["peer", "host"])
def test_after_a_restart_the_hosts_listeners_converge_to_the_vms(deployment, restarted):
    vm = vm_echo()
    offset = free_offset([vm.port])
    d = deployment("tcp")
    mirror_entry(d, [vm.port], offset)
    d.start()
    port = vm.port + offset
    wait_until(lambda: echo_works(port), what="the mirrored port")
    if restarted == "peer":
        d.peer.stop()
        wait_until(lambda: refuses(port), what="the host to close the port of a peer that is gone")
        d.host.wait_for_log("vm-ports: the control stream ended")
        d.start_peer()
    else:
        d.host.stop()
        assert refuses(port)
        d.start_host()
    wait_until(lambda: echo_works(port), timeout=30, what="the mirrored port again")
    vm.stop()


def test_a_reload_that_changes_the_ports_opens_and_closes_listeners(deployment):
    first, second = vm_echo(), vm_echo()
    offset = free_offset([first.port, second.port])
    d = deployment("local")
    entry = mirror_entry(d, [first.port], offset)
    d.start()
    wait_until(lambda: echo_works(first.port + offset), what="the first port")
    assert refuses(second.port + offset)
    entry["mirror-ports"] = str(second.port)
    write_config(d.tmp_path, d.tunnels)
    d.local.process.send_signal(signal.SIGHUP)
    wait_until(lambda: echo_works(second.port + offset) and refuses(first.port + offset), what="the ports swapped")
    first.stop()
    second.stop()


def test_status_lists_the_mirrored_ports(deployment, tmp_path):
    vm = vm_echo()
    offset = free_offset([vm.port])
    metrics = free_port()
    d = deployment("tcp")
    mirror_entry(d, [vm.port], offset)
    d.start_peer()
    d.host = Vtunnel("host", "--config-path", d.config, "--vsock", "tcp:127.0.0.1", "--metrics",
                     f"127.0.0.1:{metrics}", log_dir=tmp_path)
    wait_until(lambda: echo_works(vm.port + offset), what="the mirrored port")
    code, out, _ = run_vtunnel("status", "--metrics", f"127.0.0.1:{metrics}")
    assert code == 0 and f"VM 127.0.0.1 port {vm.port} -> host 127.0.0.1:{vm.port + offset}" in out
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=10) as answer:
        assert 'vtunnel_mirrored_ports{end="host",tunnel="vm-ports"} 1.0' in answer.read().decode()
    vm.stop()


@pytest.mark.parametrize("keys, problem", [
    ({"mirror-ports": "3000-2000"}, "key 'mirror-ports': expected TCP ports from 1 to 65535, low to high, got "
                                    "'3000-2000'"),
    ({"mirror-ports": "80,http"}, "key 'mirror-ports': expected ports and ranges such as \"3000-3999,5432\", got "
                                  "'http'"),
    ({"host-listen-address": "127.0.0.1:80"}, "key 'host-listen-address': a mirror listens on an IP"),
    ({"upstream-server-address": "127.0.0.1:1"}, "a mirror (it has mirror-ports) takes none of "
                                                 "upstream-server-address"),
    ({"host-port-offset": 70000}, "key 'host-port-offset': expected a whole number from -65534 to 65534"),
])
def test_a_bad_mirror_entry_is_named_with_its_line(tmp_path, keys, problem):
    entry = {"name": "m", "handshake-port": 7200, "vsock-peer-port": 7201, "mirror-ports": "1024-65535", **keys}
    code, _, err = run_vtunnel("check", "--config-path", write_config(tmp_path, [entry]))
    assert code == 2 and problem in err and "Traceback" not in err


def test_http_through_a_mirrored_port(deployment):
    server = HttpServer(b"from the VM")
    offset = free_offset([server.port])
    d = deployment("local")
    mirror_entry(d, [server.port], offset)
    d.start()

    def fetch():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port + offset}/", timeout=5) as r:
                return r.read()
        except OSError:
            return None
    assert wait_until(fetch, what="the page") == b"from the VM"
    server.stop()


def test_the_mirrors_own_listeners_are_never_mirrored(deployment):
    """In one process (local) the host's listener for VM port p is at p + offset: with that port in
    mirror-ports too, it is the process's own and is skipped (a loop otherwise)."""
    first, second = free_block(2)
    vm = vm_echo(port=first)
    later = socket.socket()  # bound now (its port is known), listening only once the first is mirrored
    later.bind(("127.0.0.1", second))
    offset = free_offset([first, second])
    d = deployment("local")
    mirror_entry(d, [vm.port, vm.port + offset, later.getsockname()[1]], offset)
    d.start()
    wait_until(lambda: echo_works(vm.port + offset), what="the mirrored port")
    later.listen(1)
    wait_until(lambda: not refuses(later.getsockname()[1] + offset), what="a port that came later: the watcher "
               "has looked again since the host listened on the first")
    assert f"VM port {vm.port + offset} " not in d.local.log
    vm.stop()
    later.close()


def test_only_the_other_vtunnel_gets_a_vm_port_and_only_a_mirrored_one(deployment, tmp_path):
    """A leg to the peer's vsock port asking for a VM port it does not mirror (ssh's, say) is refused
    before anything is dialled; with a leg-secret-file, a dialler without the secret gets nothing."""
    from test_trust import write_secret
    vm, secret_service = vm_echo(), vm_echo()
    offset = free_offset([vm.port])
    d = deployment("tcp")
    entry = mirror_entry(d, [vm.port], offset, **{"leg-secret-file": write_secret(tmp_path / "leg.secret")})
    d.start()
    wait_until(lambda: echo_works(vm.port + offset), what="the mirrored port, through the leg exchange")
    for opening in (b"VTML" + secret_service.port.to_bytes(2, "big"), b"VTMC"):
        with socket.create_connection(("127.0.0.1", entry["vsock-peer-port"]), timeout=10) as sock:
            sock.sendall(opening)
            sock.settimeout(30)  # 4 bytes are fewer than the exchange's hello: refused at connect-timeout (10 s)
            try:
                assert sock.recv(100) == b""  # no ports, no service: closed (or reset)
            except ConnectionResetError:
                pass
    d.peer.wait_for_log("vm-ports: refused a leg from")
    assert "the leg did not open with the leg exchange" in d.peer.log
    vm.stop()
    secret_service.stop()


def test_a_vm_port_not_mirrored_is_refused_on_the_leg(deployment):
    vm, other = vm_echo(), vm_echo()
    offset = free_offset([vm.port])
    d = deployment("tcp")
    entry = mirror_entry(d, [vm.port], offset)
    d.start()
    wait_until(lambda: echo_works(vm.port + offset), what="the mirrored port")
    with socket.create_connection(("127.0.0.1", entry["vsock-peer-port"]), timeout=10) as sock:
        sock.sendall(b"VTML" + other.port.to_bytes(2, "big") + b"GET / HTTP/1.0\r\n\r\n")
        try:
            assert sock.recv(100) == b""
        except ConnectionResetError:
            pass
    d.peer.wait_for_log(f"VM port {other.port} is not mirrored now")
    vm.stop()
    other.stop()


def test_the_host_listens_only_on_ports_its_own_config_mirrors(tmp_path):
    """A peer (or a VM) reporting more ports than the host's config mirrors gets none of the others: the
    host's config decides where the host listens, and says once that the two configs differ."""
    ours, theirs = vm_echo(), vm_echo()
    offset = free_offset([ours.port, theirs.port])
    entry = {"name": "vm-ports", "handshake-port": free_port(), "vsock-peer-port": free_port(),
             "host-port-offset": offset}
    (tmp_path / "peer").mkdir()
    (tmp_path / "host").mkdir()
    peer_config = write_config(tmp_path / "peer", [{**entry, "mirror-ports": f"{ours.port},{theirs.port}"}])
    host_config = write_config(tmp_path / "host", [{**entry, "mirror-ports": str(ours.port)}])
    peer = Vtunnel("peer", "--config-path", peer_config, "--vsock", "tcp:127.0.0.1", log_dir=tmp_path)
    host = Vtunnel("host", "--config-path", host_config, "--vsock", "tcp:127.0.0.1", log_dir=tmp_path)
    try:
        wait_until(lambda: echo_works(ours.port + offset), what="the port both configs mirror")
        host.wait_for_log(f"vm-ports: the peer reports VM ports this config does not mirror ({theirs.port})")
        assert refuses(theirs.port + offset) and host.log.count("does not mirror") == 1
    finally:
        peer.stop()
        host.stop()
        ours.stop()
        theirs.stop()


def test_a_port_that_goes_keeps_its_connections_for_the_grace_period(deployment):
    """The VM's service stops listening but its open connection goes on: through the host it carries on
    for --grace seconds (2 in these tests), then is ended as a failure, and the log says why."""
    vm = vm_echo()
    offset = free_offset([vm.port])
    d = deployment("tcp")
    mirror_entry(d, [vm.port], offset)
    d.start()
    wait_until(lambda: echo_works(vm.port + offset), what="the mirrored port")
    with socket.create_connection(("127.0.0.1", vm.port + offset), timeout=10) as sock:
        sock.sendall(b"before")
        assert sock.recv(100) == b"before"
        vm.stop()  # the listener closes; the connection's handler in the VM runs on
        d.host.wait_for_log(f"VM port {vm.port} is gone: no longer listening on 127.0.0.1:{vm.port + offset}; "
                            "1 open connection(s) have 2s to finish")
        sock.sendall(b"during")
        assert sock.recv(100) == b"during"
        assert how_it_ended(sock)[0] in ("reset", "eof")
    d.host.wait_for_log("failed (its VM port closed: grace period over)")
