"""A named-pipe server for the cross-OS tests, run under the Windows Python.

    python pipe_echo_server.py \\\\.\\pipe\\NAME INSTANCES [burst BYTES | overlapped]

Prints "ready", then per client: echoes every byte and prints "got BYTES SHA256" once the client has
closed; or, with `burst`, writes BYTES random bytes without reading any, prints "sent BYTES SHA256"
and closes its end at once (a pipe server that dies mid-reply: pipes have no reset). INSTANCES
threads serve one client each; with `overlapped`, any number of clients are echoed at once, in
greenlets over vtunnel_npipe's overlapped pipes (thousands of idle clients, no thread each).
"""

import _winapi
import hashlib
import os
import sys
import threading

PIPE_TYPE_BYTE = PIPE_READMODE_BYTE = 0


def serve(name, instances, answer):
    while True:
        handle = _winapi.CreateNamedPipe(name, _winapi.PIPE_ACCESS_DUPLEX,
                                         PIPE_TYPE_BYTE | PIPE_READMODE_BYTE | _winapi.PIPE_WAIT,
                                         instances, 65536, 65536, 0, _winapi.NULL)
        ready.set()
        try:
            _winapi.ConnectNamedPipe(handle, False)
        except OSError:
            pass
        line = answer(handle)
        _winapi.CloseHandle(handle)
        print(line, flush=True)


def echo_until_closed(handle):
    """Echo every byte on a blocking pipe handle until the client closes; (bytes, sha256) of them."""
    digest, count = hashlib.sha256(), 0
    try:
        while True:
            data, _ = _winapi.ReadFile(handle, 65536)
            if not data:
                break
            digest.update(data)
            count += len(data)
            _winapi.WriteFile(handle, data)
    except OSError:
        pass  # the client closed: the end of the stream
    return count, digest.hexdigest()


def echo(handle):
    return "got %d %s" % echo_until_closed(handle)


def burst(size):
    def answer(handle):
        data = os.urandom(size)
        _winapi.WriteFile(handle, data)
        return f"sent {size} {hashlib.sha256(data).hexdigest()}"
    return answer


def serve_overlapped(name, instances):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
    import gevent

    import vtunnel_npipe

    def echo_one(stream):
        digest, count = hashlib.sha256(), 0
        try:
            while data := stream.recv(65536):
                digest.update(data)
                count += len(data)
                stream.sendall(data)
        except OSError:
            pass
        stream.close()
        print(f"got {count} {digest.hexdigest()}", flush=True)
    listener = vtunnel_npipe.PipeListener(name, waiting=instances)
    print("ready", flush=True)
    while True:
        gevent.spawn(echo_one, listener.accept()[0])


if __name__ == "__main__":
    name, instances = sys.argv[1], int(sys.argv[2])
    if sys.argv[3:4] == ["overlapped"]:
        serve_overlapped(name, instances)
    answer = burst(int(sys.argv[4])) if sys.argv[3:4] == ["burst"] else echo
    ready = threading.Event()
    for _ in range(instances):
        threading.Thread(target=serve, args=(name, instances, answer), daemon=True).start()
    ready.wait()
    print("ready", flush=True)
    threading.Event().wait()
