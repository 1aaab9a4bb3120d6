"""Run vtunnel with one bug put in on purpose: how the process meets an error nobody expected.

    python test/e2e/inject.py FAULT VTUNNEL-ARGUMENTS...

FAULT is one of the functions below; each breaks only the tunnel named "doomed" (or, for `pump`,
connections whose first bytes are b"boom"), so the test can watch what happens to the rest; or, for
`gevent_moved`, the gevent internals vtunnel leans on.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import gevent.server  # noqa: E402

import vtunnel  # noqa: E402


def tunnel_loop():
    """The host's loop for "doomed" raises before it ever listens."""
    find_peer = vtunnel.Host.find_peer

    def broken(self, tunnel):
        if tunnel.name == "doomed":
            raise RuntimeError("injected: a bug in the tunnel's loop")
        return find_peer(self, tunnel)
    vtunnel.Host.find_peer = broken


def accept():
    """The accept loop of the peer's "doomed" listener raises at its first client."""
    do_read = gevent.server.StreamServer.do_read

    def broken(self):
        if self.name == "doomed":
            raise RuntimeError("injected: a bug in accepting")
        return do_read(self)
    gevent.server.StreamServer.do_read = broken


def pump():
    """Sending a chunk that starts with b"boom" raises, wherever the pump sends it."""
    send = vtunnel.Pump._send

    def broken(self, sock, data, direction):
        if bytes(data[:4]) == b"boom":
            raise TypeError("injected: a bug in the pump")
        return send(self, sock, data, direction)
    vtunnel.Pump._send = broken


def relay():
    """The first connection of "healthy" meets a bug after its far end is dialled, before the pump runs."""
    opened = vtunnel.Stats.opened
    hit = []

    def broken(self, pump):
        if self.label == "healthy (peer)" and not hit:
            hit.append(pump)
            raise TypeError("injected: a bug before the pump")
        return opened(self, pump)
    vtunnel.Stats.opened = broken


def stall_on_sigusr2():
    """SIGUSR2 blocks the event loop for one second (time.sleep, not gevent's): a loop stuck in a call."""
    import signal
    import time

    import gevent
    real_run = vtunnel.Service.run

    def run(self):
        gevent.signal_handler(signal.SIGUSR2, time.sleep, 1.0)
        return real_run(self)
    vtunnel.Service.run = run


def gevent_moved():
    """A gevent upgrade that moved a socket internal the pump waits with."""
    import gevent._socketcommon
    del gevent._socketcommon.SocketMixin._wait


if __name__ == "__main__":
    globals()[sys.argv[1]]()
    sys.exit(vtunnel.main(sys.argv[2:]))
