"""upstream-proxy-protocol: v2 with real vtunnel processes over the tcp: transport: a real nginx that
speaks the PROXY protocol logs the true client address (IPv4, IPv6) through a forward and a reverse
tunnel; a hand-parsed header shows the TLVs and a Unix-socket client's form; without the key nothing is
sent. nginx is Debian's (`.ci/run` installs nginx-light); without it those tests skip and say so."""

import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from helpers import Vtunnel, free_port, socket_dir, tunnel_entry, wait_until, write_config

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
needs_nginx = pytest.mark.skipif(not NGINX, reason="needs nginx (Debian: apt-get install nginx-light)")
SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


class Nginx:
    """nginx on loopback (IPv4 and IPv6), PROXY protocol on, logging what the header said."""

    def __init__(self, tmp):
        self.dir, self.port = Path(tmp), free_port()
        temp = " ".join(f"{kind}_temp_path {tmp}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi",
                                                                          "scgi"))
        (self.dir / "nginx.conf").write_text(f"""
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{}}
http {{
    {temp}
    log_format client '$proxy_protocol_addr $proxy_protocol_port';
    access_log {tmp}/access.log client;
    server {{
        listen 127.0.0.1:{self.port} proxy_protocol;
        listen [::1]:{self.port} proxy_protocol;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
""")
        self.process = subprocess.Popen([NGINX, "-p", str(tmp), "-e", f"{tmp}/error.log", "-c",
                                         str(self.dir / "nginx.conf")],
                                        stderr=subprocess.STDOUT, stdout=open(self.dir / "out.log", "wb"))  # noqa: SIM115
        wait_until(self.listening, what="nginx to listen")

    def listening(self):
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    @property
    def clients(self):
        path = self.dir / "access.log"
        return path.read_text().splitlines() if path.exists() else []

    def stop(self):
        self.process.terminate()
        self.process.wait(10)


def request(port, family=socket.AF_INET, host="127.0.0.1"):
    """GET / through the tunnel from a socket of our own; (its source port, nginx's answer)."""
    with socket.socket(family) as sock:
        sock.settimeout(30)
        sock.bind((host, 0))
        sock.connect((host, port))
        sock.sendall(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        answer = b""
        while data := sock.recv(4096):
            answer += data
        return sock.getsockname()[1], answer


def two_ends(tmp_path, entry):
    config = write_config(tmp_path, [entry])
    peer = Vtunnel("peer", "--config-path", config, "--vsock", "tcp:127.0.0.1", log_dir=tmp_path)
    host = Vtunnel("host", "--config-path", config, "--vsock", "tcp:127.0.0.1", log_dir=tmp_path)
    host.wait_for_log(f"{entry['name']}: listening on")
    if "peer-address" in entry:
        peer.wait_for_log(f"{entry['name']}: listening on")
    return peer, host


@needs_nginx
@pytest.mark.parametrize("family, address", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")],
                         ids=["IPv4", "IPv6"])
def test_nginx_sees_the_true_client_through_a_forward_tunnel(tmp_path, family, address):
    nginx = Nginx(tmp_path)
    entry = tunnel_entry("web", nginx.port)
    entry.update({"peer-address": address, "upstream-proxy-protocol": "v2"})
    peer, host = two_ends(tmp_path, entry)
    try:
        source_port, answer = request(entry["peer-port"], family, address)
        assert answer.endswith(b"ok\n"), answer
        wait_until(lambda: nginx.clients, what="nginx's access log")
        assert nginx.clients == [f"{address} {source_port}"]  # not the host process's own address
    finally:
        for process in (peer, host):
            process.stop()
        nginx.stop()


@needs_nginx
def test_nginx_sees_the_true_client_through_a_reverse_tunnel(tmp_path):
    nginx = Nginx(tmp_path)
    listen = free_port()
    entry = {"name": "rev", "handshake-port": free_port(), "vsock-peer-port": free_port(),
             "host-listen-address": f"127.0.0.1:{listen}", "upstream-server-address": f"127.0.0.1:{nginx.port}",
             "upstream-proxy-protocol": "v2"}
    peer, host = two_ends(tmp_path, entry)
    try:
        source_port, answer = request(listen)
        assert answer.endswith(b"ok\n"), answer
        wait_until(lambda: nginx.clients, what="nginx's access log")
        assert nginx.clients == [f"127.0.0.1 {source_port}"]
    finally:
        for process in (peer, host):
            process.stop()
        nginx.stop()


class HeaderRecorder(threading.Thread):
    """An upstream that parses a PROXY v2 header by hand (not with vtunnel's code), then echoes."""

    def __init__(self):
        super().__init__(daemon=True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.headers = []
        self.start()

    def run(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(10)
                start = read(conn, 16)
                if not start.startswith(SIGNATURE):
                    self.headers.append({"raw": start})
                    continue
                command, family, length = struct.unpack(">BBH", start[12:])
                body = read(conn, length)
                size = {0x11: 12, 0x21: 36, 0x31: 216, 0x00: 0}[family]
                header = {"command": command, "family": family, "addresses": body[:size], "tlvs": {}}
                rest = body[size:]
                while rest:
                    kind, tlv_length = struct.unpack(">BH", rest[:3])
                    header["tlvs"][kind] = rest[3:3 + tlv_length]
                    rest = rest[3 + tlv_length:]
                self.headers.append(header)
                while data := conn.recv(65536):
                    conn.sendall(data)

    def stop(self):
        self.listener.close()


def read(sock, size):
    data = b""
    while len(data) < size and (chunk := sock.recv(size - len(data))):
        data += chunk
    return data


def test_the_header_carries_the_tunnel_name_and_a_unix_socket_clients_form(tmp_path):
    recorder = HeaderRecorder()
    sockets = socket_dir()
    tcp = tunnel_entry("tcp", recorder.port)
    tcp["upstream-proxy-protocol"] = "v2"
    unix = tunnel_entry("unix", recorder.port)
    del unix["peer-address"], unix["peer-port"]
    unix.update({"peer-socket": f"{sockets}/client.sock", "upstream-proxy-protocol": "v2"})
    plain = tunnel_entry("plain", recorder.port)
    config = write_config(tmp_path, [tcp, unix, plain])
    peer = Vtunnel("peer", "--config-path", config, "--vsock", "tcp:127.0.0.1", log_dir=tmp_path)
    host = Vtunnel("host", "--config-path", config, "--vsock", "tcp:127.0.0.1", log_dir=tmp_path)
    try:
        for name in ("tcp", "unix", "plain"):
            host.wait_for_log(f"{name}: listening on")
        source_port, _ = echo_through(lambda: socket.create_connection(("127.0.0.1", tcp["peer-port"]), timeout=30))
        wait_until(lambda: len(recorder.headers) == 1, what="the first header")
        header = recorder.headers[0]
        assert header["command"] == 0x21 and header["family"] == 0x11
        source, destination, sport, dport = struct.unpack(">4s4sHH", header["addresses"])
        assert socket.inet_ntoa(source) == "127.0.0.1" and sport == source_port and dport == tcp["peer-port"]
        assert header["tlvs"][0xE0] == b"tcp"  # the tunnel's name; no VM identity over tcp: (emulation)

        def unix_client():
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(30)
            sock.connect(unix["peer-socket"])
            return sock
        echo_through(unix_client)
        wait_until(lambda: len(recorder.headers) == 2, what="the second header")
        header = recorder.headers[1]
        assert header["family"] == 0x31
        assert header["addresses"][108:].rstrip(b"\0") == unix["peer-socket"].encode()  # where it connected
        assert header["tlvs"][0xE0] == b"unix"
        echo_through(lambda: socket.create_connection(("127.0.0.1", plain["peer-port"]), timeout=30))
        wait_until(lambda: len(recorder.headers) == 3, what="the third connection")
        assert recorder.headers[2] == {"raw": b"hello, upstream!"}  # no key, no header: the client's bytes first
    finally:
        peer.stop()
        host.stop()
        recorder.stop()


def echo_through(connect):
    """Send 16 bytes through a tunnel to the recorder and read them back: (our source port, the echo)."""
    sock = connect()
    with sock:
        sock.sendall(b"hello, upstream!")
        echoed = read(sock, 16)
        port = sock.getsockname()[1] if sock.family != socket.AF_UNIX else None
    time.sleep(0.05)
    return port, echoed


def test_a_leg_without_the_clients_address_is_refused_before_the_upstream(tmp_path):
    """The key at the end that dials the upstream only: its legs carry no header, so it refuses them
    and says why; the upstream is never dialled."""
    recorder = HeaderRecorder()
    entry = tunnel_entry("t", recorder.port)
    (tmp_path / "peer").mkdir()
    peer = Vtunnel("peer", "--config-path", write_config(tmp_path / "peer", [entry]), "--vsock", "tcp:127.0.0.1",
                   log_dir=tmp_path)
    host = Vtunnel("host", "--config-path", write_config(tmp_path, [{**entry, "upstream-proxy-protocol": "v2"}]),
                   "--vsock", "tcp:127.0.0.1", log_dir=tmp_path)
    try:
        host.wait_for_log("t: listening on")
        with socket.create_connection(("127.0.0.1", entry["peer-port"]), timeout=30) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
            try:
                assert sock.recv(100) == b""
            except ConnectionResetError:
                pass
        host.wait_for_log("refused a leg from 127.0.0.1: the leg did not start with the client's address (a PROXY "
                          "v2 header): is upstream-proxy-protocol set at both ends?")
        assert recorder.headers == []
    finally:
        peer.stop()
        host.stop()
        recorder.stop()


@needs_nginx
def test_nginx_takes_a_unix_socket_clients_header(tmp_path):
    """A peer-socket client: the header has the AF_UNIX form, which nginx accepts; it logs no address for
    it ("- -"), having none of an IP to show (the hand-parsed test above checks the paths)."""
    nginx = Nginx(tmp_path)
    entry = tunnel_entry("web", nginx.port)
    del entry["peer-address"], entry["peer-port"]
    entry.update({"peer-socket": f"{socket_dir()}/client.sock", "upstream-proxy-protocol": "v2"})
    config = write_config(tmp_path, [entry])
    peer = Vtunnel("peer", "--config-path", config, "--vsock", "tcp:127.0.0.1", log_dir=tmp_path)
    host = Vtunnel("host", "--config-path", config, "--vsock", "tcp:127.0.0.1", log_dir=tmp_path)
    try:
        host.wait_for_log("web: listening on")
        wait_until(lambda: os.path.exists(entry["peer-socket"]), what="the peer's socket")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(30)
            sock.connect(entry["peer-socket"])
            sock.sendall(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
            answer = b""
            while data := sock.recv(4096):
                answer += data
        assert answer.endswith(b"ok\n"), answer
        wait_until(lambda: nginx.clients, what="nginx's access log")
        assert nginx.clients == ["- -"]
    finally:
        peer.stop()
        host.stop()
        nginx.stop()
