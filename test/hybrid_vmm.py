"""A stand-in for the VMM half of hybrid vsock, written from the protocol Firecracker and Cloud Hypervisor
publish (Firecracker's docs/vsock.md), not from vtunnel's code:

- host-initiated: the VMM listens on `uds_path`; a host program connects, writes `CONNECT <port>\\n`,
  and the VMM connects to that vsock port in the guest and answers `OK <host-side port>\\n`, after which
  the stream is the guest's; no listener in the guest: the VMM closes the connection;
- guest-initiated: a guest's connection to host port P is connected to the Unix socket `uds_path_P`.

"The guest" here is either real AF_VSOCK (inside the QEMU guest of test/vsockvm.sh, the peer at CID 1)
or, everywhere else, Unix sockets named PREFIX_PORT (vtunnel's unix: transport). Bytes are relayed by two
threads per connection. An end of stream is passed on as the kind it was: a half-close (shutdown of the
writing side) as a half-close, a socket closed outright (a zero-length send to it fails) or reset as a
shutdown of both directions, which is what a VMM's SHUTDOWN with both flags means.
"""

import contextlib
import errno
import socket
import threading

OK_ANSWER = b"OK 1073741824\n"  # the port number is the VMM's host-side one; its value is not used


class Guest:
    """The guest's vsock ports as one socket family sees them: `address(port)` to dial a port,
    `listen_address(port)` to listen on one."""

    def __init__(self, family, address, listen_address):
        self.family, self.address, self.listen_address = family, address, listen_address

    def dial(self, port):
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.settimeout(5)
        try:
            sock.connect(self.address(port))
        except OSError:
            sock.close()
            raise
        sock.settimeout(None)
        return sock

    def listen(self, port):
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.bind(self.listen_address(port))
        sock.listen(64)
        return sock


def unix_guest(prefix):
    """Guest vsock port P is the Unix socket PREFIX_P."""
    return Guest(socket.AF_UNIX, lambda port: f"{prefix}_{port}", lambda port: f"{prefix}_{port}")


def vsock_guest(cid=1):
    """Guest vsock port P is AF_VSOCK port P at `cid` (1: the guest itself, with vsock_loopback)."""
    return Guest(socket.AF_VSOCK, lambda port: (cid, port), lambda port: (socket.VMADDR_CID_ANY, port))


class HybridVmm:
    """answer: "ok" (as the VMMs do), "refuse" (close after CONNECT, as for a port nobody listens on),
    or "silent" (read CONNECT, then never answer)."""

    def __init__(self, uds_path, guest, guest_ports=(), answer="ok"):
        self.uds_path, self.guest, self.answer = uds_path, guest, answer
        self.connects, self.lock, self.held = [], threading.Lock(), []
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(uds_path)
        self.listener.listen(64)
        self.guest_listeners = {port: guest.listen(port) for port in guest_ports}
        self._thread(self._accept_host)
        for port, listener in self.guest_listeners.items():
            self._thread(self._accept_guest, listener, port)

    def stop(self):
        for sock in [self.listener, *self.guest_listeners.values(), *self.held]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    @staticmethod
    def _thread(target, *args):
        threading.Thread(target=target, args=args, daemon=True).start()

    def _accept_host(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self._thread(self._host_initiated, conn)

    def _host_initiated(self, conn):
        line = b""
        while not line.endswith(b"\n") and len(line) < 32:
            byte = conn.recv(1)
            if not byte:
                conn.close()
                return
            line += byte
        words = line.split()
        if len(words) != 2 or words[0] != b"CONNECT" or not words[1].isdigit():
            conn.close()
            return
        port = int(words[1])
        with self.lock:
            self.connects.append(port)
        if self.answer == "silent":
            self.held.append(conn)
            return
        if self.answer == "refuse":
            conn.close()
            return
        try:
            guest = self.guest.dial(port)
        except OSError:
            conn.close()  # nothing listens on that port in the guest
            return
        conn.sendall(OK_ANSWER)
        relay(conn, guest)

    def _accept_guest(self, listener, port):
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            self._thread(self._guest_initiated, conn, port)

    def _guest_initiated(self, conn, port):
        host = socket.socket(socket.AF_UNIX)
        try:
            host.connect(f"{self.uds_path}_{port}")
        except OSError:
            host.close()
            conn.close()  # nothing listens on the host for that port
            return
        relay(conn, host)


def relay(a, b):
    """Carry bytes both ways until both directions have ended, then close both."""
    done, written_out = [threading.Event(), threading.Event()], set()  # the sockets we half-closed
    threading.Thread(target=_copy, args=(a, b, done[0], written_out), daemon=True).start()
    threading.Thread(target=_copy, args=(b, a, done[1], written_out), daemon=True).start()

    def close_when_done():
        for event in done:
            event.wait()
        a.close()
        b.close()
    threading.Thread(target=close_when_done, daemon=True).start()


def _copy(src, dst, done, written_out):
    try:
        while True:
            try:
                data = src.recv(65536)
            except OSError:  # a reset
                data, outright = b"", True
            else:  # once we half-closed src ourselves, a zero-length send to it fails anyway
                outright = not data and src not in written_out and _closed_outright(src)
            if not data:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_RDWR if outright else socket.SHUT_WR)
                written_out.add(dst)
                return
            try:
                dst.sendall(data)
            except OSError:
                with contextlib.suppress(OSError):
                    src.shutdown(socket.SHUT_RDWR)
                return
    finally:
        done.set()


def _closed_outright(sock):
    """After an end of stream: whether the other side closed rather than half-closed (a zero-length send
    fails once it can no longer receive)."""
    try:
        sock.send(b"")
    except OSError as exc:
        return exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN)
    return False
