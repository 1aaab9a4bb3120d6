"""The failure matrix: what the far side sees when one side fails, for every kind of leg.

For each transport between the ends (`tcp:`, `unix:`, `hybrid:` through a stand-in VMM), each kind of
client (TCP, a peer-socket) and each kind of upstream (TCP, `unix:///`), one side ends its connection
in failure mid-transfer and the other side's outcome is recorded: "reset" or "eof" (a clean end of
stream). The README's failure table is this test's expectation.

A TCP end is failed with SO_LINGER 0 (a reset). A Unix-socket end has no reset of its own: it fails
the only way the kernel tells, by closing with bytes it never read still queued (the other end then
gets ECONNRESET). vtunnel, aborting a Unix socket, has no unread bytes to leave behind, so a client
or upstream on a Unix socket sees vtunnel's abort as an end of stream: those cells read "eof".
"""

import os
import socket
import threading
import time

import pytest
from test_vsock import in_vsock_guest

from helpers import how_it_ended, reset, socket_dir, wait_until

VSOCK_GUEST = pytest.mark.skipif(not in_vsock_guest(), reason="real AF_VSOCK runs only inside the throwaway "
                                 "guest of test/vsockvm.sh (tox -e vsock)")

PAYLOAD = 100_000
KINDS = ["tcp", "unix"]


def fail(sock):
    """End `sock` in failure: a reset on TCP; on a Unix socket, a close with unread bytes."""
    if sock.family == socket.AF_UNIX:
        sock.close()  # the caller left bytes unread
    else:
        reset(sock)


class ScriptedUpstream(threading.Thread):
    """An upstream on TCP or a Unix socket that plays one part per connection."""

    def __init__(self, kind, path):
        super().__init__(daemon=True)
        if kind == "tcp":
            self.listener = socket.create_server(("127.0.0.1", 0))
            self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        else:
            self.listener = socket.socket(socket.AF_UNIX)
            self.listener.bind(path)
            self.listener.listen(16)
            self.address = f"unix://{path}"
        self.part, self.seen = None, []
        self.start()

    def run(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            conn.settimeout(20)
            with conn:
                if self.part == "fails":  # the client's hello stays unread
                    time.sleep(0.3)
                    conn.sendall(os.urandom(PAYLOAD))
                    fail(conn)
                else:  # sees what happens when the client fails
                    conn.sendall(b"hi")
                    self.seen.append(how_it_ended(conn)[0])

    def stop(self):
        self.listener.close()


def connect_client(kind, entry):
    if kind == "tcp":
        sock = socket.create_connection(("127.0.0.1", entry["peer-port"]), timeout=20)
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(20)
        sock.connect(entry["peer-socket"])
    return sock


# What arrives, after the fix: a failure is a reset wherever the far side is on TCP, whatever the
# transport between the ends; a Unix-socket client or upstream sees an end of stream.
EXPECTED = {("upstream fails", client, upstream): "reset" if client == "tcp" else "eof"
            for client in KINDS for upstream in KINDS}
EXPECTED.update({("client fails", client, upstream): "reset" if upstream == "tcp" else "eof"
                 for client in KINDS for upstream in KINDS})


IN_GUEST = [pytest.mark.vsock, VSOCK_GUEST]


@pytest.mark.parametrize("transport", ["tcp", "unix", "hybrid", pytest.param("vsock", marks=IN_GUEST),
                                       pytest.param("hybrid-vsock", marks=IN_GUEST)])
def test_failure_matrix(deployment, transport):
    d = deployment(transport)
    directory = socket_dir()
    upstreams, entries = {}, {}
    for client in KINDS:
        for upstream in KINDS:
            name = f"{client}-to-{upstream}"
            upstreams[name] = ScriptedUpstream(upstream, f"{directory}/{name}-upstream.sock")
            extra = {"peer_socket": f"{directory}/{name}.sock"} if client == "unix" else {}
            entries[name] = d.add_tunnel(name, upstream=upstreams[name].address, **extra)
    d.start()
    d.wait_ready()
    found = {}
    try:
        for (client, upstream), name in {(c, u): f"{c}-to-{u}" for c in KINDS for u in KINDS}.items():
            wait_until(lambda n=name: entries[n].get("peer-port") or os.path.exists(entries[n]["peer-socket"]),
                       what="the peer's listener")
            server = upstreams[name]

            server.part = "fails"
            sock = connect_client(client, entries[name])
            sock.sendall(b"hello")
            found[("upstream fails", client, upstream)], _ = how_it_ended(sock)
            sock.close()

            server.part = "watches"
            sock = connect_client(client, entries[name])
            time.sleep(0.3)  # the upstream's "hi" arrives and stays unread
            sock.sendall(os.urandom(PAYLOAD))
            time.sleep(0.3)
            fail(sock)
            wait_until(lambda s=server: s.seen, what="the upstream to see the end")
            found[("client fails", client, upstream)] = server.seen.pop()
    finally:
        for server in upstreams.values():
            server.stop()
    print(f"transport {transport}:")
    for case in sorted(found):
        print(f"  {case[0]:15} client {case[1]:4} upstream {case[2]:4} -> {found[case]}")
    assert found == EXPECTED
