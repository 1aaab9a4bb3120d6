"""vtunnel_npipe under a real Windows Python (Wine in CI): real named pipes, made by the test."""

import hashlib
import os
import socket
import sys
import threading
import time

import pytest

from helpers import read_all

pytestmark = [pytest.mark.windows,
              pytest.mark.skipif(sys.platform != "win32", reason="named pipes need Windows (tox -e windows "
                                 "runs this under Wine)")]

if sys.platform == "win32":
    import _winapi

    import gevent
    from pipe_echo_server import echo_until_closed

    import vtunnel
    import vtunnel_npipe


PIPE_TYPE_BYTE = PIPE_READMODE_BYTE = 0  # _winapi names only the message-mode flags


def pipe_name(tag):
    return rf"\\.\pipe\vtunnel-test-{tag}-{os.getpid()}-{time.monotonic_ns()}"


class PipeServer(threading.Thread):
    """A named-pipe server on plain (blocking) handles: `serve(handle)` runs once per client."""

    def __init__(self, serve, instances=1, clients=1):
        super().__init__(daemon=True)
        self.name_, self.serve, self.instances, self.clients = pipe_name("srv"), serve, instances, clients
        self.received = []
        self.ready = threading.Event()
        self.start()
        self.ready.wait(5)

    def run(self):
        for _ in range(self.clients):
            handle = _winapi.CreateNamedPipe(
                self.name_, _winapi.PIPE_ACCESS_DUPLEX,
                PIPE_TYPE_BYTE | PIPE_READMODE_BYTE | _winapi.PIPE_WAIT,
                self.instances, 65536, 65536, 0, _winapi.NULL)
            self.ready.set()
            try:
                _winapi.ConnectNamedPipe(handle, False)
            except OSError:
                pass  # the client was quicker than ConnectNamedPipe: already connected
            try:
                self.serve(self, handle)
            finally:
                _winapi.CloseHandle(handle)


def echo(server, handle):
    server.received.append(echo_until_closed(handle))


def write_then_close(size):
    def serve(server, handle):
        data = b"".join(hashlib.sha256(bytes([i % 256])).digest() for i in range(size // 32))
        server.sent = data
        _winapi.WriteFile(handle, data)
    return serve


def test_echo_with_checksums_both_ways():
    server = PipeServer(echo)
    stream = vtunnel_npipe.connect(server.name_, 5)
    payload = os.urandom(8 * 1024 * 1024)
    received = []

    def reader():
        got = 0
        digest = hashlib.sha256()
        while got < len(payload):
            data = stream.recv(262144)
            assert data
            digest.update(data)
            got += len(data)
        received.append(digest.hexdigest())
    r = gevent.spawn(reader)
    stream.sendall(payload)  # while the reader reads: full duplex
    r.get(timeout=60)
    stream.close()
    server.join(10)
    assert received == [hashlib.sha256(payload).hexdigest()]
    assert server.received == [(len(payload), hashlib.sha256(payload).hexdigest())]


def test_server_that_writes_then_closes_is_read_to_the_end():
    server = PipeServer(write_then_close(1024 * 1024))
    stream = vtunnel_npipe.connect(server.name_, 5)
    assert read_all(stream) == server.sent
    assert stream.recv(10) == b""
    stream.close()


def test_busy_pipe_waits_then_fails_clearly():
    server = PipeServer(lambda s, h: time.sleep(3), instances=1)
    first = vtunnel_npipe.connect(server.name_, 5)
    start = time.monotonic()
    with pytest.raises(vtunnel_npipe.PipeError) as caught:
        vtunnel_npipe.connect(server.name_, 0.5)
    assert 0.4 < time.monotonic() - start < 5
    assert "busy" in str(caught.value) or "no such" in str(caught.value)
    first.close()


def test_busy_pipe_is_opened_once_an_instance_frees_up():
    def hold_then_echo(server, handle):
        if not server.received:
            server.received.append("held")
            time.sleep(1)
        else:
            echo(server, handle)
    server = PipeServer(hold_then_echo, instances=1, clients=2)
    first = vtunnel_npipe.connect(server.name_, 5)
    second = vtunnel_npipe.connect(server.name_, 10)  # waits out the first client
    second.sendall(b"ping")
    assert second.recv(4) == b"ping"
    first.close()
    second.close()


def test_missing_pipe_is_a_clear_error():
    with pytest.raises(vtunnel_npipe.PipeError, match="no such named pipe"):
        vtunnel_npipe.connect(pipe_name("missing"), 1)


def test_close_cancels_a_pending_read():
    server = PipeServer(lambda s, h: time.sleep(5))
    stream = vtunnel_npipe.connect(server.name_, 5)
    reader = gevent.spawn(stream.recv, 100)
    gevent.sleep(0.3)
    start = time.monotonic()
    stream.close()
    with pytest.raises(OSError):
        reader.get(timeout=5)
    assert time.monotonic() - start < 3


def test_the_pump_carries_a_socket_to_a_pipe_and_back():
    """No half-close on pipes: the socket's end stops the writes, the pipe's end ends the reads."""
    server = PipeServer(write_then_close(2 * 1024 * 1024))
    listener = gevent.socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = gevent.socket.create_connection(listener.getsockname())
    near, _ = listener.accept()
    pump = gevent.spawn(vtunnel.Pump(near, vtunnel_npipe.connect(server.name_, 5)).run)
    client.sendall(b"request")
    client.shutdown(socket.SHUT_WR)
    assert read_all(client) == server.sent  # everything the pipe wrote, then end of stream
    done = pump.get(timeout=10)
    assert done.sent == [7, len(server.sent)] and done.failure is None


def test_a_pipe_client_lets_the_server_identify_it_but_not_impersonate_it(monkeypatch):
    """CreateFile with SECURITY_SQOS_PRESENT | SECURITY_IDENTIFICATION: a user who takes the upstream's
    pipe name while its server is down cannot act as vtunnel's token (by default it could)."""
    calls = []
    create = _winapi.CreateFile

    def recording(*args):
        calls.append(args)
        return create(*args)
    monkeypatch.setattr(_winapi, "CreateFile", recording)
    server = PipeServer(echo)
    stream = vtunnel_npipe.connect(server.name_, timeout=5)
    stream.close()
    flags = calls[0][5]
    assert flags & 0x00100000, "SECURITY_SQOS_PRESENT"
    assert flags & (3 << 16) == 1 << 16, "SecurityIdentification, not SecurityImpersonation (2 << 16)"
    assert flags & 0x40000000, "FILE_FLAG_OVERLAPPED"
