"""vtunnel_mirror: what port mirroring needs that is not a tunnel (`mirror-ports` entries).

The peer finds the VM's TCP listeners here (sock_diag over netlink, as `ss -ltn` does, or /proc/net/tcp
and tcp6 where that is refused; those on a loopback or wildcard address) and the two ends speak the
mirror's wire here. vtunnel.py carries the bytes; this
module imports nothing of it.

The wire, on the entry's vsock-peer-port, after the leg checks every leg has (the transport's source
check, then the leg exchange when the entry has a leg-secret-file). The host dials; its first 4 bytes
say what the stream is:

- `VTMC`: the control stream. The peer answers at once with the VM's mirrored listeners, one line
  `PORTS <port>=<address>,...\\n` (ASCII; the address a service listens on: 127.0.0.1, ::1, 0.0.0.0 or
  ::; `PORTS \\n` for none), and again with the whole set whenever it changes; nothing else. Either end
  closing it ends the mirror until the host dials it again.
- `VTML` and the VM port as 2 bytes, big-endian: a client's connection; the peer dials that port on the
  address it last reported for it, and the stream is then the client's bytes both ways. A port the
  peer does not mirror (now) closes the leg.
"""

import ipaddress
import os
import re
import socket
import struct

CONTROL = b"VTMC"
LEG = b"VTML"
KIND_SIZE = 4
MAX_LINE = 1 << 20  # a PORTS line: 65,535 ports of "65535=[::]," fit in well under 1 MiB
POLL_INTERVAL = 0.25  # seconds between looks at /proc/net/tcp: a new listener shows within this
LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's st column


def parse_ports(text):
    """'1024-65535' or '3000-3999,5432' (or a YAML integer) -> a frozenset of TCP ports; ValueError."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ValueError(f"expected ports and ranges such as \"3000-3999,5432\", got {text!r}")
    ports = set()
    for part in str(text).split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise ValueError(f"expected ports and ranges such as \"3000-3999,5432\", got {part.strip()!r}")
        low, high = int(match[1]), int(match[2] or match[1])
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"expected TCP ports from 1 to 65535, low to high, got {part.strip()!r}")
        ports.update(range(low, high + 1))
    return frozenset(ports)


def describe_ports(ports):
    """A frozenset of ports as ranges: '3000-3999,5432'."""
    ranges, ordered = [], sorted(ports)
    for port in ordered:
        if ranges and ranges[-1][1] == port - 1:
            ranges[-1][1] = port
        else:
            ranges.append([port, port])
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in ranges)


def own_socket_inodes():
    """The inodes of this process's sockets: its own listeners are never mirrored (no loops)."""
    inodes = set()
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return inodes
    for name in names:
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def listening_ports(wanted, excluded_inodes=frozenset()):
    """{port: address} of the TCP listeners on a loopback or wildcard address whose port is in
    `wanted`. A port listened on at several addresses is reported at one: the wildcard, else IPv4.

    Asked of the kernel with sock_diag (netlink), which walks the listeners only: /proc/net/tcp lists
    every socket, and reading it 4 times a second beside 1,000 open sockets took 6 % of a core."""
    found = {}
    try:
        listeners = _diag_listeners()
    except (OSError, AttributeError):  # refused, or no AF_NETLINK (not Linux: /proc says nothing either)
        listeners = _proc_listeners()
    for ip, port, inode in listeners:
        if port in wanted and str(inode) not in excluded_inodes and (ip.is_loopback or ip.is_unspecified):
            found[port] = _preferred(found.get(port), ip)
    return {port: str(ip) for port, ip in found.items()}


NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY = 4, 20
NLM_F_REQUEST, NLM_F_DUMP, NLMSG_DONE, NLMSG_ERROR = 0x1, 0x300, 3, 2
TCPF_LISTEN = 1 << 10
INET_DIAG_MSG = struct.Struct("=BBBB2H16s16sI2IIIIII")  # inet_diag_msg: ports and addresses big-endian


def _diag_listeners():
    """(ip, port, inode) of every TCP listener, IPv4 and IPv6, from the kernel's sock_diag."""
    listeners = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as sock:
        for family in (socket.AF_INET, socket.AF_INET6):
            # inet_diag_req_v2: family, protocol, ext, pad, states, then a zeroed inet_diag_sockid
            request = struct.pack("=BBBxI", family, socket.IPPROTO_TCP, 0, TCPF_LISTEN) + bytes(48)
            sock.send(struct.pack("=IHHII", 16 + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP,
                                  1, 0) + request)
            listeners += _read_dump(sock, family)
    return listeners


def _read_dump(sock, family):
    found, size = [], 16 if family == socket.AF_INET6 else 4
    while True:
        data = sock.recv(65536)
        offset = 0
        while offset + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, offset)
            if kind == NLMSG_DONE:
                return found
            if kind == NLMSG_ERROR or length < 16:
                raise OSError("sock_diag refused the request")
            fields = INET_DIAG_MSG.unpack_from(data, offset + 16)
            port = socket.ntohs(fields[4])
            ip = ipaddress.ip_address(fields[6][:size])
            found.append((ip.ipv4_mapped or ip if ip.version == 6 else ip, port, fields[-1]))
            offset += (length + 3) & ~3


def _proc_listeners():
    """The same, from /proc/net/tcp and tcp6 (where sock_diag is refused)."""
    listeners = []
    for path, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            with open(path) as table:
                next(table, None)
                for line in table:
                    fields = line.split()
                    if len(fields) < 10 or fields[3] != LISTEN:
                        continue
                    address, _, port = fields[1].partition(":")
                    if len(address) == width:
                        listeners.append((_proc_address(address), int(port, 16), int(fields[9])))
        except OSError:
            continue
    return listeners


def _proc_address(hex_text):
    """/proc/net/tcp's address: the IP's bytes in host order, 4 bytes at a time."""
    raw = bytes.fromhex(hex_text)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)) if _little_endian() else raw
    ip = ipaddress.ip_address(words)
    return ip.ipv4_mapped or ip if ip.version == 6 else ip


def _little_endian():
    return struct.pack("=I", 1) == b"\x01\x00\x00\x00"


def _preferred(current, ip):
    """Of two addresses one port listens on, the one to dial through: a wildcard covers both families."""
    if current is None:
        return ip
    rank = (ip.is_unspecified, ip.version == 4)
    return ip if rank > (current.is_unspecified, current.version == 4) else current


def dial_address(address):
    """Where the peer dials a service that listens on `address`: a wildcard through its loopback."""
    ip = ipaddress.ip_address(address)
    if ip.is_unspecified:
        return "::1" if ip.version == 6 else "127.0.0.1"
    return address


def ports_line(ports):
    """The control stream's line for {port: address}."""
    return ("PORTS " + ",".join(f"{port}={address}" for port, address in sorted(ports.items())) + "\n").encode()


def parse_ports_line(line):
    """A control line -> {port: address}; ValueError for anything else."""
    text = line.decode("ascii")
    if not text.startswith("PORTS ") or not text.endswith("\n"):
        raise ValueError(f"expected a PORTS line, got {text[:40]!r}")
    ports = {}
    for item in filter(None, text[6:-1].split(",")):
        port, _, address = item.partition("=")
        ipaddress.ip_address(address)
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"expected PORT=ADDRESS, got {item[:40]!r}")
        ports[int(port)] = address
    return ports


def leg_header(port):
    return LEG + struct.pack("!H", port)
