"""Name resolution when DNS misbehaves: a nameserver that never answers, and one that says no.

`vtunnel local` runs in a mount namespace of its own (`unshare -m`) whose /etc/resolv.conf points at a
nameserver this test runs on a loopback address: it answers NXDOMAIN for names that start with "nx"
and never answers anything else. The resolver is told to wait 20 s per query, far longer than any
tunnel's connect-timeout, so a dial that waits for the resolver instead of its own deadline shows.
The hosts file is the machine's own: `localhost` is answered from it, never from DNS.
"""

import os
import random
import shutil
import socket
import struct
import threading
import time

import pytest

from helpers import Vtunnel, echo_server, tunnel_entry, write_config

RESOLVER_TIMEOUT = 20  # seconds glibc waits for each query (its cap is 30)
CLIENTS = 50


def nameserver_socket():
    """A UDP socket on port 53 of a random loopback address, or a reason the test cannot have one."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return None, "needs root and unshare(1): a mount namespace with its own /etc/resolv.conf"
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    address = f"127.{random.randrange(1, 255)}.{random.randrange(1, 255)}.{random.randrange(2, 255)}"
    try:
        sock.bind((address, 53))
    except OSError as exc:
        sock.close()
        return None, f"cannot listen on {address}:53: {exc}"
    return sock, None


def serve_dns(sock):
    """NXDOMAIN for names that start with 'nx', silence for the rest; until the socket closes."""
    while True:
        try:
            query, client = sock.recvfrom(4096)
        except OSError:
            return
        if len(query) < 13 or query[13:15] != b"nx":  # first label's first bytes (after its length)
            continue
        end = query.index(b"\0", 12) + 5  # the question: the name, then type and class
        header = query[:2] + struct.pack(">HHHHH", 0x8183, 1, 0, 0, 0)  # a response: no such name
        sock.sendto(header + query[12:end], client)


@pytest.fixture(scope="module")
def silent_dns(tmp_path_factory):
    sock, reason = nameserver_socket()
    if sock is None:
        pytest.skip(reason)
    threading.Thread(target=serve_dns, args=(sock,), daemon=True).start()
    tmp = tmp_path_factory.mktemp("dns")
    resolv = tmp / "resolv.conf"
    resolv.write_text(f"nameserver {sock.getsockname()[0]}\noptions timeout:{RESOLVER_TIMEOUT} attempts:1\n")
    upstream = echo_server()
    tunnels = [tunnel_entry("silent", 0, upstream=f"silent.vtunnel.test:{upstream.port}"),
               tunnel_entry("nx", 0, upstream=f"nx.vtunnel.test:{upstream.port}"),
               tunnel_entry("by-name", 0, upstream=f"localhost:{upstream.port}"),
               tunnel_entry("by-address", upstream.port)]
    for tunnel in tunnels:
        tunnel["connect-timeout"] = 1
    config = write_config(tmp, tunnels)
    in_namespace = ["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/resolv.conf && exec "$@"', str(resolv)]
    vtunnel = Vtunnel("local", "--config-path", config, log_dir=tmp, prefix=in_namespace)
    try:
        for tunnel in tunnels:
            vtunnel.wait_for_log(f"{tunnel['name']}: listening on 127.0.0.1")
        yield {"vtunnel": vtunnel, "ports": {t["name"]: t["peer-port"] for t in tunnels}}
    finally:
        vtunnel.stop()
        print(vtunnel.log)
        upstream.stop()
        sock.close()


def dial_through(port, payload=b"x"):
    """(what the client got: 'echo', 'eof', 'reset' or 'hung', seconds it took)."""
    started = time.monotonic()
    try:  # a reset may beat connect() back to us: the peer accepts, and fails the client at once
        with socket.create_connection(("127.0.0.1", port), timeout=3 * RESOLVER_TIMEOUT) as sock:
            sock.sendall(payload)
            got = sock.recv(len(payload))
            what = "echo" if got == payload else "eof"
    except (ConnectionResetError, BrokenPipeError):
        what = "reset"
    except TimeoutError:
        what = "hung"
    return what, time.monotonic() - started


def test_a_silent_dns_fails_each_dial_at_its_connect_timeout_not_the_resolvers(silent_dns):
    """Before: the dial waited for the resolver (20 s here), and 50 clients queued behind 10 threads."""
    results = [None] * CLIENTS

    def client(i):
        results[i] = dial_through(silent_dns["ports"]["silent"])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {what for what, _ in results} == {"reset"}
    slowest = max(seconds for _, seconds in results)
    assert slowest < RESOLVER_TIMEOUT / 2, f"a client waited {slowest:.1f}s for a 1 s connect-timeout"
    silent_dns["vtunnel"].wait_for_log("upstream unreachable: resolving silent.vtunnel.test timed out")


def test_a_hung_lookup_never_delays_another_tunnel(silent_dns):
    """50 lookups hang on one tunnel; a tunnel to `localhost` and one to an address carry at once."""
    hanging = [threading.Thread(target=dial_through, args=(silent_dns["ports"]["silent"],)) for _ in range(CLIENTS)]
    for thread in hanging:
        thread.start()
    try:
        time.sleep(0.5)  # the clients are in: their lookups hang for the next 20 s
        for name in ("by-name", "by-address"):
            what, seconds = dial_through(silent_dns["ports"][name])
            assert what == "echo", name
            assert seconds < RESOLVER_TIMEOUT / 2, f"{name} waited {seconds:.1f}s behind the silent lookups"
    finally:
        for thread in hanging:
            thread.join()


def test_a_name_that_does_not_exist_fails_at_once_and_says_so(silent_dns):
    what, seconds = dial_through(silent_dns["ports"]["nx"])
    assert what == "reset"
    silent_dns["vtunnel"].wait_for_log("upstream unreachable: resolving nx.vtunnel.test: name or service not known")
