"""Soak: a bounded run of mixed traffic, every byte checked, the counters matching what clients did.

VTUNNEL_SOAK_SECONDS sets the length (default 60).
"""

import os
import random
import socket
import threading
import time

from helpers import HttpServer, echo_server, exchange, parse_stats, reset, sha256

SECONDS = float(os.environ.get("VTUNNEL_SOAK_SECONDS", "60"))


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.connections = self.sent = self.received = 0
        self.errors = []

    def add(self, sent, received):
        with self.lock:
            self.connections += 1
            self.sent += sent
            self.received += received


def web_client(port, body, tally, deadline):
    request = b"GET / HTTP/1.0\r\nHost: soak\r\n\r\n"
    while time.monotonic() < deadline:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(request)
            reply = b"".join(iter(lambda: sock.recv(65536), b""))
        tally.add(len(request), len(reply))
        if not reply.endswith(body) or not reply.startswith(b"HTTP/1.0 200"):
            tally.errors.append("bad page")


def stream_client(port, tally, deadline, seed):
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        payload = rng.randbytes(rng.randrange(1, 16 * 1024 * 1024))
        echoed = exchange(port, payload)
        tally.add(len(payload), len(echoed))
        if sha256(echoed) != sha256(payload):
            tally.errors.append("stream corrupted")


def chaos_client(port, tally, deadline, seed):
    rng = random.Random(seed)
    while time.monotonic() < deadline:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        try:
            sock.sendall(rng.randbytes(rng.randrange(0, 500_000)))
            if rng.random() < 0.5:
                sock.recv(rng.randrange(1, 1000))
        except OSError:
            pass
        reset(sock)  # often mid-stream
        tally.add(0, 0)
        time.sleep(rng.random() / 20)


def test_soak_mixed_traffic(deployment):
    body = os.urandom(20_000)
    web, echo, chaos = HttpServer(body), echo_server(), echo_server()
    d = deployment("tcp")
    entries = {"web": d.add_tunnel("web", web.port), "stream": d.add_tunnel("stream", echo.port),
               "chaos": d.add_tunnel("chaos", chaos.port)}
    d.start()
    d.wait_ready()
    tallies = {name: Tally() for name in entries}
    deadline = time.monotonic() + SECONDS
    port = {name: entry["peer-port"] for name, entry in entries.items()}
    clients = [threading.Thread(target=web_client, args=(port["web"], body, tallies["web"], deadline))
               for _ in range(4)]
    clients += [threading.Thread(target=stream_client, args=(port["stream"], tallies["stream"], deadline, i))
                for i in range(3)]
    clients += [threading.Thread(target=chaos_client, args=(port["chaos"], tallies["chaos"], deadline, i))
                for i in range(2)]
    for client in clients:
        client.start()
    for client in clients:
        client.join(SECONDS + 120)
    assert not any(client.is_alive() for client in clients)
    assert d.stop() == [0, 0]
    for name in ("web", "stream"):
        t = tallies[name]
        assert not t.errors, t.errors[:3]
        for role in ("peer", "host"):
            final = parse_stats(getattr(d, role).log)[f"{name} ({role})"]
            print(f"{name} ({role}): clients made {t.connections} connections, sent {t.sent}, "
                  f"received {t.received}; the tunnel counted {final}")
            assert final == {"open": 0, "total": t.connections, "to": t.sent, "back": t.received,
                             "failures": "none", "refused": "none"}
    chaos_final = parse_stats(d.peer.log)["chaos (peer)"]
    assert chaos_final["total"] == tallies["chaos"].connections and chaos_final["open"] == 0
    assert tallies["web"].connections > 100 and tallies["stream"].connections > 3
    for server in (web, echo, chaos):
        server.stop()
