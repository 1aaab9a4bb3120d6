"""Who may use a tunnel leg: with `leg-secret-file`, only a holder of the shared secret, at either end;
and who the client is: with `upstream-proxy-protocol: v2`, a PROXY v2 header for the upstream (at the end).

The leg is the connection between the two vtunnels (AF_VSOCK, AF_HYPERV, or the emulated tcp: and
unix: transports). Which machine may dial it at all is the transport's business (vtunnel.py checks
an AF_VSOCK leg's CID); this module proves, per leg and in both directions, that the other end holds
the secret before a single byte of the connection crosses: a stranger dialling the acceptor is refused
before the upstream is dialled, and a squatter on the acceptor's port (a VM process that bound the port
while the peer was down) never gets a byte of the client. RefusalLog keeps the log of refused legs short.

The exchange, before any payload byte; K is the secret file's content without surrounding whitespace,
PORT the leg's vsock port as 4 bytes, big-endian; Nd and Na are 32 random bytes each, new for every leg:

    dialler  -> acceptor   "VTLA" 0x01 Nd        37 bytes
    acceptor -> dialler    "VTLA" 0x01 Na MACa   69 bytes, MACa = HMAC-SHA256(K, "vtunnel leg acceptor" PORT Nd Na)
    dialler  -> acceptor   MACd                  32 bytes, MACd = HMAC-SHA256(K, "vtunnel leg dialler" PORT Nd Na)

then the connection's bytes, raw, as on a leg without the exchange. The dialler sends the client's
bytes only once MACa checks out, so a leg costs one round trip more before its first byte. The secret
never crosses; each side's MAC covers the other's fresh nonce, so a recorded exchange replayed to either
end fails; the two labels keep one side's MAC from being reflected back as the other's. MACs are
compared in constant time (hmac.compare_digest). The caller puts a deadline on the whole exchange.
"""

import hashlib
import hmac
import os
import secrets
import socket
import stat
import struct
import sys
import time

MAGIC = b"VTLA\x01"
NONCE_SIZE = MAC_SIZE = 32
HELLO_SIZE = len(MAGIC) + NONCE_SIZE  # what a dialler sends before the acceptor has proved itself
SHORTEST_SECRET = 16  # bytes: `head -c 32 /dev/urandom | base64` makes 44
HINT = "is leg-secret-file set, to the same secret, at both ends?"


class LegSecretError(ValueError):
    """A leg-secret-file that cannot be used; the message says why and what to do."""


class LegRefused(Exception):
    """A leg that failed the exchange: `reason` for the counters, the message for the log."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


class LegSecret:
    """The secret in `path`, a file only its owner may read (as ssh requires of a private key). It is
    read again whenever the file changes, so a new secret applies to the next leg without a restart."""

    def __init__(self, path):
        self.path = os.path.expanduser(path)
        self._seen, self._key = None, None
        self.key()  # the checks, at load time

    def __eq__(self, other):
        return isinstance(other, LegSecret) and other.path == self.path

    def __hash__(self):
        return hash(self.path)

    def __repr__(self):
        return f"LegSecret({self.path!r})"

    def key(self):
        try:
            info = os.stat(self.path)
            seen = (info.st_ino, info.st_mtime_ns, info.st_size, info.st_mode, info.st_uid)
            if seen != self._seen:
                self._check(info)
                with open(self.path, "rb") as file:
                    key = file.read().strip()
                if len(key) < SHORTEST_SECRET:
                    raise LegSecretError(f"{self.path} holds {len(key)} bytes: expected {SHORTEST_SECRET} or more "
                                         f"(make one with: head -c 32 /dev/urandom | base64 > {self.path})")
                self._seen, self._key = seen, key
        except OSError as exc:
            raise LegSecretError(f"cannot read {self.path}: {exc.strerror}") from None
        return self._key

    def _check(self, info):
        if not stat.S_ISREG(info.st_mode):
            raise LegSecretError(f"{self.path} is not a regular file")
        if sys.platform != "win32":  # Windows: the file's ACL decides; its mode bits say nothing
            if info.st_mode & 0o077:
                raise LegSecretError(f"{self.path} may be read by others (mode {stat.S_IMODE(info.st_mode):04o}): "
                                     f"chmod 600 {self.path}")
            if info.st_uid != os.geteuid():
                raise LegSecretError(f"{self.path} belongs to uid {info.st_uid}, not to the user running vtunnel")


def _mac(key, label, port, dialler_nonce, acceptor_nonce):
    message = b"vtunnel leg " + label + struct.pack(">I", port) + dialler_nonce + acceptor_nonce
    return hmac.new(key, message, hashlib.sha256).digest()


def read_exactly(stream, size):
    """Up to `size` bytes from a stream; fewer only if it ends first."""
    data = b""
    while len(data) < size:
        chunk = stream.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def prove_as_dialler(stream, key, port):
    """The dialling end's half of the exchange; raises LegRefused unless the acceptor holds `key`."""
    dialler_nonce = secrets.token_bytes(NONCE_SIZE)
    stream.sendall(MAGIC + dialler_nonce)
    magic = read_exactly(stream, len(MAGIC))
    if not magic:
        raise LegRefused("no answer", f"the other end closed the leg without answering the leg exchange: {HINT}")
    if magic != MAGIC:
        raise LegRefused("no exchange", f"the other end answered something else than the leg exchange: {HINT}")
    acceptor_nonce = read_exactly(stream, NONCE_SIZE)
    if acceptor_nonce == dialler_nonce:  # our own hello, echoed: the other end passes bytes on unchecked
        raise LegRefused("no exchange", f"the other end sent this end's hello back, as an end without a secret "
                                        f"that carries the leg to an echoing upstream does: {HINT}")
    acceptor_mac = read_exactly(stream, MAC_SIZE)
    if not hmac.compare_digest(acceptor_mac, _mac(key, b"acceptor", port, dialler_nonce, acceptor_nonce)):
        raise LegRefused("wrong secret", "the other end does not hold this leg secret (another secret, or a "
                                         "process squatting on the port): it got no byte of the connection")
    stream.sendall(_mac(key, b"dialler", port, dialler_nonce, acceptor_nonce))


def prove_as_acceptor(stream, key, port):
    """The accepting end's half; raises LegRefused unless the dialler holds `key`."""
    magic = read_exactly(stream, len(MAGIC))  # first alone: a client's bytes are refused at once
    if not magic:
        raise LegRefused("no exchange", "the leg closed before the leg exchange")
    if magic != MAGIC:
        raise LegRefused("no exchange", f"the leg did not open with the leg exchange: {HINT} (the Go vtunnel "
                                        "has none)")
    dialler_nonce, acceptor_nonce = read_exactly(stream, NONCE_SIZE), secrets.token_bytes(NONCE_SIZE)
    stream.sendall(MAGIC + acceptor_nonce + _mac(key, b"acceptor", port, dialler_nonce, acceptor_nonce))
    dialler_mac = read_exactly(stream, MAC_SIZE)
    if not dialler_mac:
        raise LegRefused("no exchange", f"the dialler left the leg exchange (it found this end's proof wrong): {HINT}")
    if not hmac.compare_digest(dialler_mac, _mac(key, b"dialler", port, dialler_nonce, acceptor_nonce)):
        raise LegRefused("wrong secret", "the dialler does not hold this leg secret (another secret, or a replayed "
                                         "exchange)")


def opens_with_the_exchange(first_bytes):
    """Whether a leg's first bytes are a dialler's hello: how an end without a secret names the cause."""
    return first_bytes == MAGIC


class RefusalLog:
    """Whether to log a refused leg: one line per source and reason a minute, saying how many were
    refused since the last line, so a VM that dials in a loop cannot flood the log."""

    def __init__(self, period=60.0, sources=1000):
        self.period, self.sources = period, sources
        self.last = {}  # (source, reason) -> [when last logged, refused since]

    def count(self, source, reason):
        """None: stay quiet; else how many legs this line stands for (this one included)."""
        now = time.monotonic()
        entry = self.last.get((source, reason))
        if entry is not None and now - entry[0] < self.period:
            entry[1] += 1
            return None
        if len(self.last) >= self.sources:  # forget the quiet ones: the table stays bounded
            self.last = {k: v for k, v in self.last.items() if now - v[0] < self.period}
        refused = 1 + (entry[1] if entry else 0)
        self.last[(source, reason)] = [now, 0]
        return refused


# ---- Who the client is: PROXY protocol v2 (HAProxy's specification), for the upstream ----
#
# With `upstream-proxy-protocol: v2`, the end that accepted the client sends its addresses on the leg as a
# PROXY v2 header (after the leg exchange, if any); the other end reads it and, once it has dialled the
# upstream, sends the upstream the same addresses with its own TLVs: the tunnel's name (TLV_TUNNEL) and,
# where it knows it, the VM side's identity (TLV_VM: "cid:N", "hyperv:GUID").

PROXY_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PROXY_LOCAL, PROXY_PROXY = 0x20, 0x21  # version 2, and the command
PROXY_FAMILIES = {0x00: 0, 0x11: 12, 0x21: 36, 0x31: 216}  # UNSPEC, TCP over IPv4, over IPv6, UNIX stream
TLV_TUNNEL, TLV_VM = 0xE0, 0xE1  # in the range the specification leaves to applications
LONGEST_PROXY_HEADER = 16 + 216 + 1024


def proxy_header(addresses, tlvs=()):
    """A PROXY v2 header. `addresses` is (family, source, destination) as socket calls give them (an
    AF_INET or AF_INET6 (host, port, ...), or an AF_UNIX path), or None: a LOCAL header (no client
    address, as for a named-pipe client)."""
    command, family, block = PROXY_LOCAL, 0x00, b""
    if addresses is not None:
        command, (family, block) = PROXY_PROXY, _address_block(*addresses)
    return proxy_header_from(command, family, block, tlvs)


def _address_block(family, source, destination):
    if family in (socket.AF_INET, socket.AF_INET6):
        packed = [socket.inet_pton(family, address[0]) for address in (source, destination)]
        ports = struct.pack(">HH", source[1], destination[1])
        return (0x11 if family == socket.AF_INET else 0x21), packed[0] + packed[1] + ports
    paths = [(path if isinstance(path, bytes) else (path or "").encode())[:108].ljust(108, b"\0")
             for path in (source, destination)]
    return 0x31, paths[0] + paths[1]


def proxy_header_from(command, family, block, tlvs=()):
    """A header from its parts: the command and family bytes, the address block, and (type, bytes) TLVs."""
    extra = b"".join(struct.pack(">BH", kind, len(value)) + value for kind, value in tlvs)
    return PROXY_SIGNATURE + struct.pack(">BBH", command, family, len(block) + len(extra)) + block + extra


def read_proxy_header(stream):
    """(command, family, address block) of the PROXY v2 header a leg starts with; raises LegRefused."""
    start = read_exactly(stream, 16)
    if len(start) < 16 or not start.startswith(PROXY_SIGNATURE):
        raise LegRefused("no client address", "the leg did not start with the client's address (a PROXY v2 "
                                              "header): is upstream-proxy-protocol set at both ends?")
    command, family, length = struct.unpack(">BBH", start[12:])
    rest = read_exactly(stream, length) if length <= LONGEST_PROXY_HEADER else b""
    if command not in (PROXY_LOCAL, PROXY_PROXY) or family not in PROXY_FAMILIES or len(rest) != length \
            or length < PROXY_FAMILIES[family]:
        raise LegRefused("no client address", f"the client's address on the leg is not a PROXY v2 header vtunnel "
                                              f"sends (command {command:#x}, family {family:#x}, {length} bytes)")
    return command, family, rest[:PROXY_FAMILIES[family]]
