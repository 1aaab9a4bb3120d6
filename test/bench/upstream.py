"""The benchmark's upstream: a gevent echo server (one process, so it is never the bottleneck of a
single relay's connection rate). Prints its port, then serves until killed."""

import sys

import gevent.server


def echo(sock, address):
    buffer = bytearray(262144)
    view = memoryview(buffer)
    try:
        while n := sock.recv_into(buffer):
            sock.sendall(view[:n])
    except OSError:
        pass
    finally:
        sock.close()


if __name__ == "__main__":
    server = gevent.server.StreamServer(("127.0.0.1", 0), echo, backlog=4096)
    server.start()
    print(server.server_port, flush=True)
    sys.stdout.close()
    server.serve_forever()
