"""A named-pipe echo server for the cross-OS tests, run under the Windows Python.

    python pipe_echo_server.py \\\\.\\pipe\\NAME INSTANCES

Prints "ready", then one line "got BYTES SHA256" per finished client.
"""

import _winapi
import hashlib
import sys
import threading

PIPE_TYPE_BYTE = PIPE_READMODE_BYTE = 0


def serve(name, instances):
    while True:
        handle = _winapi.CreateNamedPipe(name, _winapi.PIPE_ACCESS_DUPLEX,
                                         PIPE_TYPE_BYTE | PIPE_READMODE_BYTE | _winapi.PIPE_WAIT,
                                         instances, 65536, 65536, 0, _winapi.NULL)
        ready.set()
        try:
            _winapi.ConnectNamedPipe(handle, False)
        except OSError:
            pass
        count, hexdigest = echo_until_closed(handle)
        _winapi.CloseHandle(handle)
        print(f"got {count} {hexdigest}", flush=True)


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


if __name__ == "__main__":
    name, instances = sys.argv[1], int(sys.argv[2])
    ready = threading.Event()
    for _ in range(instances):
        threading.Thread(target=serve, args=(name, instances), daemon=True).start()
    ready.wait()
    print("ready", flush=True)
    threading.Event().wait()
