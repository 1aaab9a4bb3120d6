"""vtunnel: a TCP tunnel over VM sockets.

Usage:
  vtunnel peer  --config-path PATH [--vsock TRANSPORT] [--metrics ADDRESS] [options]
  vtunnel host  --config-path PATH [--vsock TRANSPORT] [--vm-id GUID] [--metrics ADDRESS] [options]
  vtunnel local --config-path PATH [--metrics ADDRESS] [options]
  vtunnel check --config-path PATH
  vtunnel status --metrics ADDRESS
  vtunnel reload --metrics ADDRESS
  vtunnel (-h | --help)
  vtunnel --version

Commands:
  peer   inside the VM: listen on each tunnel's peer-address:peer-port and
         carry every client to the host over vsock.
  host   on the host: find the peer, listen on each tunnel's vsock-host-port
         and carry every connection to the tunnel's upstream server.
  local  both ends in one process over loopback TCP: try a config with no VM.
  check  validate the config and print its tunnels.
  status ask a vtunnel running with --metrics ADDRESS how its tunnels are.
  reload tell a vtunnel running with --metrics ADDRESS to re-read its config,
         as SIGHUP does (Windows has no SIGHUP).

Options:
  --config-path PATH   the YAML file with the 'tunnel:' list.
  --vsock TRANSPORT    how vsock ports are reached: vsock, vsock:CID, hyperv,
                       tcp:IP, unix:PREFIX or hybrid:PATH (the host of a
                       Firecracker or Cloud Hypervisor VM: PATH is the VMM's
                       vsock socket) [default: vsock on Linux, hyperv on
                       Windows]. Who may dial a leg: vsock, only the other
                       end's CID (2, or CID); hyperv, only the served VM;
                       tcp:, any local process; unix: and hybrid:, the owner
                       of the socket files (0600). leg-secret-file narrows
                       any of them to holders of a secret.
  --vm-id GUID         host on Hyper-V: the VM to serve, skipping discovery.
  --log-level LEVEL    debug, info, warning or error [default: info].
  --grace SECONDS      on SIGINT/SIGTERM, how long open connections may
                       finish before they are closed [default: 5].
  --stats-interval SECONDS
                       log each tunnel's counters this often; 0 is never
                       (they are logged on SIGUSR1 and at exit) [default: 0].
  --metrics ADDRESS    serve the counters over HTTP: /metrics for Prometheus,
                       /status as JSON, POST /reload; on IP:PORT or
                       unix:///PATH (mode 0600).
  -h --help            show this text.
  --version            show the version.

Exit codes: 0 stopped cleanly, 1 could not run (port in use, transport
unavailable), 2 bad command line or config.
"""

# The map. The docstring above is the --help text; this is for the reader. Each section uses only
# those above it, and owns one thing:
#
#   1. Constants and errors      the seed phrase, sizes, timeouts, exit codes; UsageError, StartupError
#   2. Config                    the YAML file -> Tunnel records; every problem told at once, with line
#   3. Sockets                   listen and dial (TCP, Unix), name lookups (Resolver), tune_tcp, abort
#   4. Endpoints, transports     Endpoint: where one side of a connection is. TcpEndpoint, UnixEndpoint,
#                                PipeEndpoint, and VsockEndpoint, a port of a Transport (vsock, tcp:, unix:,
#                                hybrid: the Unix sockets of Firecracker's and Cloud Hypervisor's VMM)
#   5. Hyper-V                   HyperVTransport: the Windows host's vsock; reads and writes complete through
#                                vtunnel_npipe's completion port, connect and accept block in threads
#   6. The pump                  Pump: two streams, two greenlets, every byte; small messages carried by
#                                the loop's callback while a greenlet waits; splice on Linux; OffLoop: a
#                                bulk direction carried by a thread, so interactive ones never wait
#   7. Servers and the service   accept loops, counters (Stats), a TunnelRun per tunnel and end, signals,
#                                reload (SIGHUP, POST /reload), the grace period, the exit code, the
#                                --metrics listener; systemd's side: sd_notify (Notifier), socket
#                                activation (ActivatedSockets)
#   8. Peer and host             the two roles (Role: carry a client to a leg, or a leg to the upstream;
#                                forward or reverse); relay() dials the far end for each connection and pumps
#   9. Finding the VM            Windows: every running VM is handshaked at once
#  10. Command line              parse_args, run, main; status and reload ask a running vtunnel
#
# Four sibling modules, imported by this one and importing nothing of it: vtunnel_npipe (Windows: named
# pipes, and the overlapped I/O through one completion port that the Windows host's streams share),
# vtunnel_trust (leg-secret-file: the leg exchange that proves both ends hold the secret; the refusal log),
# vtunnel_mirror (mirror-ports: the VM's listeners, asked of the kernel, and the mirror's wire; section 8
# carries a mirror's control stream and legs) and vtunnel_metrics (the --metrics HTTP application, which
# section 7 serves).
#
# A new kind of endpoint subclasses Endpoint (listen, connect, close_listener, __str__). A new vsock
# family subclasses Transport (family, listen_address, dial_address; refuses, if it can tell who
# dialled). The pump asks of a stream only recv, sendall, shutdown, settimeout and close (between two
# gevent sockets it also reads and writes their descriptors from the loop's callback, and on Linux
# splices).

import collections
import errno
import functools
import gc
import ipaddress
import itertools
import json
import logging
import os
import re
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial

try:
    import gevent
    import gevent.event
    import gevent.hub
    import gevent.lock
    import gevent.pool
    import gevent.pywsgi
    import gevent.server
    import gevent.socket
    import gevent.threadpool
    import greenlet
    import yaml

    import vtunnel_metrics
    import vtunnel_mirror
    import vtunnel_npipe
    import vtunnel_trust
except ModuleNotFoundError as exc:  # `python3 vtunnel.py` with a Python outside vtunnel's venv: one line
    if __name__ != "__main__":
        raise
    sys.exit(f"vtunnel: this Python ({sys.executable}) has no module {exc.name!r}: run vtunnel with the Python "
             "of the venv it is installed in, or install what it needs: pip install gevent pyyaml docopt-ng")

if sys.platform.startswith("linux"):
    import fcntl  # splice's pipe sizes, and unsent_bytes
    import termios  # unsent_bytes

__version__ = "0.1.0"

log = logging.getLogger("vtunnel")


# --------------------------------------------------------------------------
# 1. Constants and errors
# --------------------------------------------------------------------------

SEED_PHRASE = b"github.com/rancher-sandbox/rancher-desktop-vtunnel"
HYPERV_SERVICE_TEMPLATE = "{port:08X}-FACB-11E6-BD58-64006A7986D3"
VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_CID_HOST = 2
CHUNK_SIZE = 256 * 1024  # the largest read: bulk transfers
SMALL_READ = 8 * 1024  # the first read of each direction, and the smallest
READS_PER_TURN = 4  # reads a busy direction makes on the loop before other connections get a turn
OFF_LOOP_AFTER = 1024 * 1024  # bytes moved with no gap over OFF_LOOP_GAP make a direction bulk: a thread
OFF_LOOP_GAP = 0.01  # takes it over (OffLoop)
OFF_LOOP_THREADS = 32  # bulk directions carried at once by threads beside the event loop
OFF_LOOP_POLL = 0.02  # how often a thread carrying a direction looks whether its connection has failed
OFF_LOOP_QUIET = 0.25  # seconds a direction in a thread may be quiet before it goes back to the loop
OFF_LOOP_NICE = 19  # the priority of those threads: the kernel runs the loop (interactive traffic) first
OFF_LOOP_SLICE = 0.5  # seconds a thread carries a direction before giving it back while others wait for one
LISTEN_BACKLOG = 1024
CONNECT_TIMEOUT = 10.0
PROBE_TIMEOUT = 2.0  # seconds to ask whether a live process listens on a socket file in our way
HANDSHAKE_TIMEOUT = 5.0
HANDSHAKE_BACKOFF = (0.25, 3.0)  # first and longest wait between handshake attempts
PEER_CHECK_INTERVAL = 10.0  # seconds between the handshakes that notice a VM has gone
ACCEPT_PAUSE = 0.5  # seconds an accept loop rests when the process is out of file descriptors
STREAM_CEILING = 20_000  # Windows: overlapped streams (connection ends) the process holds before new clients wait
RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
BROKEN_LISTENER_ERRORS = (errno.EBADF, errno.EINVAL, errno.ENOTSOCK)  # gevent's fatal_errors too
METRICS_SLOTS = 64  # connections the --metrics endpoint serves at once
RELOAD_WAIT = 5.0  # seconds a reload waits for its new tunnels to listen before it answers "pending"
MIRROR_RETRY = 10.0  # seconds between tries of a mirrored port the host could not listen on
MIRROR_MAX_PORTS = 4096  # listeners one mirror opens at most: a VM cannot spend all the host's descriptors
ASK_TIMEOUT = 30.0  # seconds `vtunnel status` and `vtunnel reload` wait for an answer
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad command line or config: the user must change something (exit 2)."""


class StartupError(Exception):
    """The environment refuses to run us: port taken, transport missing (exit 1)."""


class ConfigError(UsageError):
    """Everything wrong with a config, one line per problem."""

    def __init__(self, errors):
        self.errors = [error.replace("\n", "\\n") for error in errors]
        super().__init__("\n".join(self.errors))


# --------------------------------------------------------------------------
# 2. Config: the YAML file, checked whole before anything opens
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Tunnel:
    """One `tunnel:` entry. Forward (the peer listens, the host dials the upstream) or reverse
    (the host listens, the peer dials the upstream inside the VM)."""
    name: str
    handshake_port: int
    upstream: object  # TcpEndpoint or UnixEndpoint; PipeEndpoint too, forward only
    vsock_host_port: int = None  # forward: the host listens here on vsock
    peer: object = None  # forward: TcpEndpoint or UnixEndpoint, where the peer listens
    vsock_peer_port: int = None  # reverse: the peer listens here on vsock
    host_listen: object = None  # reverse: TcpEndpoint, UnixEndpoint or PipeEndpoint, where the host listens
    max_connections: int = None  # None: no limit
    connect_timeout: float = CONNECT_TIMEOUT
    idle_timeout: float = None  # None: connections may idle forever
    leg_secret: object = None  # vtunnel_trust.LegSecret: each leg proves both ends hold it
    proxy_protocol: str = None  # "v2": the upstream is told the client's address (a PROXY v2 header)
    mirror_ports: frozenset = None  # a mirror (host -> VM): the VM's listeners on these ports, each its own
    exclude_ports: frozenset = frozenset()  # ... but these
    host_port_offset: int = 0  # ... listened on at the host on host_listen's IP, VM port + this
    line: int = field(default=0, compare=False)  # where the entry is: moving it changes no tunnel

    @property
    def reverse(self):
        return self.host_listen is not None

    @property
    def mirror(self):
        return self.mirror_ports is not None

    @property
    def leg_port(self):
        """The vsock port the tunnel's legs connect to, whichever end listens on it."""
        return self.vsock_peer_port if self.reverse else self.vsock_host_port

    @property
    def clients_at(self):
        """Where the tunnel's clients connect: the peer's address, or (reverse) the host's."""
        return self.host_listen if self.reverse else self.peer

    @property
    def direction(self):
        return "host -> VM (mirror)" if self.mirror else "host -> VM" if self.reverse else "VM -> host"


HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_][A-Za-z0-9_-]{0,62})*\.?$")
UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the terminating NUL


def format_host_port(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _integer(value):
    # YAML booleans are ints to Python; a port of "true" is a typo, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {_show(value)}")
    return value


def _tcp_port(value):
    if not 1 <= _integer(value) <= 65535:
        raise ValueError(f"expected a TCP port from 1 to 65535, got {value}")
    return value


def _vsock_port(value):
    if not 0 <= _integer(value) <= 0xFFFFFFFF:
        raise ValueError(f"expected a vsock port from 0 to 4294967295, got {value}")
    return value


def _positive_integer(value):
    if _integer(value) < 1:
        raise ValueError(f"expected a whole number of at least 1, got {value}")
    return value


def _seconds(value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e9:
        raise ValueError(f"expected a number of seconds greater than 0, got {_show(value)}")
    return float(value)


def _text(value):
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise ValueError(f"expected a non-empty string, got {_show(value)}")
    return str(value)


# Rights on a pipe that only its owner may hold: FILE_CREATE_PIPE_INSTANCE (0x4: whoever holds it can
# serve the name too and read other clients' requests), WRITE_DAC, WRITE_OWNER, and the generic rights
# that include them. As SDDL letters: GA, GW, FA, FW, KA, KW and LC include 0x4; WD and WO are the others.
OWNER_ONLY_RIGHTS = 0x4 | 0x40000 | 0x80000 | 0x10000000 | 0x40000000 | 0x02000000
OWNER_ONLY_LETTERS = {"GA", "GW", "FA", "FW", "KA", "KW", "LC", "WD", "WO"}
# Who may hold them: LocalSystem, the Administrators, the pipe's owner, or one account (S-1-5-21-...,
# presumably the user running vtunnel; the default DACL names exactly that one).
OWNER_LIKE_SIDS = {"SY", "BA", "OW", "S-1-5-18", "S-1-5-32-544"}


def _pipe_sddl(value):
    """host-pipe-sddl: refused where an allow entry gives anyone but the owner the rights above."""
    text = _text(value)
    for kind, rights, sid in re.findall(r"\(([^;()]*);[^;()]*;([^;()]*);[^;()]*;[^;()]*;([^;()]*)\)", text):
        if kind.upper() != "A" or sid.upper() in OWNER_LIKE_SIDS or sid.upper().startswith("S-1-5-21-"):
            continue
        if rights[:2].lower() == "0x" or rights.isdigit():
            dangerous = int(rights, 0) & OWNER_ONLY_RIGHTS
        else:
            dangerous = OWNER_ONLY_LETTERS & {rights[i:i + 2].upper() for i in range(0, len(rights), 2)}
        if dangerous:
            raise ValueError(f"the entry for {sid} grants {rights}, which lets it create instances of the pipe "
                             "(and so read other clients' requests) or change its DACL: give clients "
                             "0x12019b (read and write), e.g. \"D:P(A;;GA;;;SY)(A;;GA;;;OW)(A;;0x12019b;;;AU)\"")
    return text


def _leg_secret_file(value):
    try:
        return vtunnel_trust.LegSecret(_text(value))
    except vtunnel_trust.LegSecretError as exc:
        raise ValueError(str(exc)) from None


def _proxy_protocol(value):
    if value != "v2":
        raise ValueError(f"expected v2 (PROXY protocol version 2, binary), got {_show(value)}")
    return value


def _host(value):
    value = _text(value)
    if _is_ip(value):
        return value
    if not HOSTNAME.match(value):
        raise ValueError(f"expected an IP address or a host name, got {value!r}")
    if value.rstrip(".").rpartition(".")[2].isdigit():  # no top-level domain is a number (RFC 3696)
        raise ValueError(f"expected an IP address or a host name, got {value!r}, which is neither "
                         "(an IPv4 address is four numbers from 0 to 255)")
    return value


def _socket_path(value):
    path = os.path.expanduser(_text(value))
    if not path.startswith("/"):
        raise ValueError(f"expected an absolute path, got {value!r}")
    if len(path.encode()) > UNIX_PATH_MAX:
        raise ValueError(f"a Unix socket path holds at most {UNIX_PATH_MAX} bytes, this one {len(path.encode())}")
    return path


def _file_mode(value):
    # Unquoted, YAML reads 0600 as octal but 600 as decimal: only a string says clearly what is meant.
    if not isinstance(value, str) or not re.fullmatch(r"0?[0-7]{3}", value):
        raise ValueError(f'expected an octal string such as "0600", got {_show(value)}')
    return int(value, 8)


@functools.lru_cache(maxsize=64)  # the upstream's host is asked about at every dial
def _is_ip(text):
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def ip_family(host):
    """The address family of an IP literal (a host name resolves to either)."""
    return socket.AF_INET6 if ":" in host else socket.AF_INET


@functools.lru_cache(maxsize=64)  # asked at every dial
def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_host_port(text):
    """'IP:port', '[IPv6]:port' or 'hostname:port' -> (host, port)."""
    bracketed = re.fullmatch(r"\[([^\]]+)\]:(\d+)", text)
    if bracketed:
        host, port = bracketed.groups()
        if ":" not in host or not _is_ip(host):
            raise ValueError(f"expected an IPv6 address inside [ ], got {host!r}")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f"expected HOST:PORT, got {text!r}")
        if ":" in host:
            raise ValueError(f"an IPv6 address needs brackets: [{host}]:{port}")
        host = _host(host)
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"expected a TCP port from 1 to 65535 after the colon, got {port!r}")
    return host, int(port)


UPSTREAM_FORMS = "HOST:PORT, [IPv6]:PORT, unix:///PATH or npipe:////./pipe/NAME"


def parse_upstream(value):
    """An upstream-server-address -> TcpEndpoint, UnixEndpoint or PipeEndpoint."""
    text = _text(value)
    if text.startswith("npipe://"):
        path = text[len("npipe://"):]
        if not re.fullmatch(r"//[^/]+/pipe/[^/].*", path):
            raise ValueError(f"expected npipe:////./pipe/NAME, got {text!r}")
        return PipeEndpoint(path.replace("/", "\\"))
    if text.startswith("unix://"):
        try:
            return UnixEndpoint(_socket_path(text[len("unix://"):]))
        except ValueError as exc:
            raise ValueError(f"expected unix:///PATH: {exc}") from None
    if "://" in text:
        raise ValueError(f"expected {UPSTREAM_FORMS}, got {text!r}")
    return TcpEndpoint(*parse_host_port(text))


def _port_offset(value):
    if not -65534 <= _integer(value) <= 65534:
        raise ValueError(f"expected a whole number from -65534 to 65534, got {value}")
    return value


def _mirror_listen(value):
    """A mirror's host-listen-address: an IP, where each mirrored port listens."""
    text = _text(value)
    host = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    if not _is_ip(host):
        raise ValueError(f"a mirror listens on an IP (each VM port at VM port + host-port-offset): expected an IP "
                         f"such as 127.0.0.1, got {text!r}")
    return TcpEndpoint(host, 0)


REQUIRED = object()


KEYS = {  # key: (field, convert, default); REQUIRED keys must be present
    "name": ("name", _text, None),  # the Go vtunnel ignores names, and its configs leave them empty
    "handshake-port": ("handshake_port", _vsock_port, REQUIRED),
    "vsock-host-port": ("vsock_host_port", _vsock_port, None),
    "peer-address": ("peer_address", _host, None),
    "peer-port": ("peer_port", _tcp_port, None),
    "peer-socket": ("peer_socket", _socket_path, None),
    "peer-socket-mode": ("peer_socket_mode", _file_mode, None),
    "upstream-server-address": ("upstream", parse_upstream, REQUIRED),
    "max-connections": ("max_connections", _positive_integer, None),
    "connect-timeout": ("connect_timeout", _seconds, CONNECT_TIMEOUT),
    "idle-timeout": ("idle_timeout", _seconds, None),
    "leg-secret-file": ("leg_secret", _leg_secret_file, None),
    "upstream-proxy-protocol": ("proxy_protocol", _proxy_protocol, None),
    "vsock-peer-port": ("vsock_peer_port", _vsock_port, None),
    "host-listen-address": ("host_listen_address", parse_upstream, None),
    "host-socket-mode": ("host_socket_mode", _file_mode, None),
    "host-pipe-sddl": ("host_pipe_sddl", _pipe_sddl, None),
    "mirror-ports": ("mirror_ports", vtunnel_mirror.parse_ports, None),
    "exclude-ports": ("exclude_ports", vtunnel_mirror.parse_ports, frozenset()),
    "host-port-offset": ("host_port_offset", _port_offset, 0),
}
FORWARD_KEYS = ("vsock-host-port", "peer-address", "peer-port", "peer-socket", "peer-socket-mode")
REVERSE_KEYS = ("vsock-peer-port", "host-listen-address", "host-socket-mode", "host-pipe-sddl")
MIRROR_KEYS = ("mirror-ports", "exclude-ports", "host-port-offset")


class _Mapping(dict):
    """A YAML mapping that remembers where it and each of its keys stand."""
    line = 0
    key_lines = {}


class _Sequence(list):
    line = 0
    item_lines = []


class _ConfigLoader(yaml.SafeLoader):
    """SafeLoader that keeps line numbers, and notes duplicate and non-string keys in `problems`
    (line, text) rather than stopping at the first: every problem of a file is told at once."""

    def __init__(self, stream):
        super().__init__(stream)
        self.problems = []

    def construct_tracked_mapping(self, node):
        mapping = _Mapping()
        mapping.line = node.start_mark.line + 1
        mapping.key_lines = {}
        self.flatten_mapping(node)
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                self.problems.append((line, f"a key must be a string, not {_show(key)}"))
            elif key in mapping:
                self.problems.append((line, f"key {key!r} appears twice (first on line {mapping.key_lines[key]})"))
            else:
                mapping[key] = self.construct_object(value_node, deep=True)
                mapping.key_lines[key] = line
        return mapping

    def construct_tracked_sequence(self, node):
        sequence = _Sequence(self.construct_object(child, deep=True) for child in node.value)
        sequence.line = node.start_mark.line + 1
        sequence.item_lines = [child.start_mark.line + 1 for child in node.value]
        return sequence
_ConfigLoader.add_constructor("tag:yaml.org,2002:map", _ConfigLoader.construct_tracked_mapping)
_ConfigLoader.add_constructor("tag:yaml.org,2002:seq", _ConfigLoader.construct_tracked_sequence)


def _show(value):
    if value is None:
        return "nothing"
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    return f"{type(value).__name__} {value!r}"


def load_config(path):
    """Read and validate a config file; raise ConfigError naming file, line and key."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read the config: {_reason(exc)}"]) from None
    return parse_config(text, path)


def parse_config(text, path="<config>"):
    loader = None
    try:
        loader = _ConfigLoader(text)
        document = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        raise ConfigError([f"{path}:{mark.line + 1}: not valid YAML: {exc.problem}"]) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError([f"{path}:{line}: not valid YAML: character {exc.character!r} is not allowed"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from None
    finally:
        if loader:
            loader.dispose()
    errors = [f"{path}:{line}: not valid YAML: {problem}" for line, problem in loader.problems]
    entries = _read_document(document, path, errors)
    _check_unique(entries, path, errors)  # the invalid entries too: every problem at once
    if errors:
        raise ConfigError(errors)
    return entries


def _read_document(document, path, errors):
    if not isinstance(document, dict):
        errors.append(f"{path}:1: expected a mapping with a 'tunnel:' list, got {_show(document)}")
        return []
    for key in document:
        if key != "tunnel":
            errors.append(f"{path}:{document.key_lines[key]}: unknown key {key!r}: expected 'tunnel'")
    entries = document.get("tunnel")
    line = document.key_lines.get("tunnel", document.line)
    if not isinstance(entries, list) or not entries:
        errors.append(f"{path}:{line}: key 'tunnel': expected a non-empty list of tunnels, "
                      f"got {_show(entries) if entries != [] else 'an empty list'}")
        return []
    return [tunnel for index, entry in enumerate(entries)
            if (tunnel := _read_tunnel(entry, index, entries.item_lines[index], path, errors)) is not None]


def _read_tunnel(entry, index, line, path, errors):
    label = f"tunnel #{index + 1}"
    if not isinstance(entry, dict):
        errors.append(f"{path}:{line}: {label}: expected a mapping of tunnel keys, got {_show(entry)}")
        return None
    if entry.get("name") in ("", None):  # as the Go vtunnel's own configs have them
        named = _Mapping(entry, name=f"tunnel-{index + 1}")
        named.line, named.key_lines, entry = line, {"name": line, **entry.key_lines}, named
    if isinstance(entry["name"], str):
        label = f"tunnel {entry['name']!r}"
    fields, problems = {}, []
    for key in entry:
        if key not in KEYS:
            problems.append((entry.key_lines[key], f"unknown key {key!r}: expected one of {', '.join(KEYS)}"))
    mirror = "mirror-ports" in entry
    for key, (attr, convert, default) in KEYS.items():
        if key not in entry:
            if default is REQUIRED and not (mirror and key == "upstream-server-address"):
                problems.append((line, f"missing key '{key}'"))
            fields[attr] = None if default is REQUIRED else default
            continue
        if mirror and key == "host-listen-address":
            convert = _mirror_listen
        try:
            fields[attr] = convert(entry[key])
        except ValueError as exc:
            problems.append((entry.key_lines[key], f"key '{key}': {exc}"))
    ends = {attr: fields.pop(attr, None) for attr in PEER_FIELDS + HOST_LISTEN_FIELDS}
    if mirror:
        fields["host_listen"] = _read_mirror(entry, fields, ends, line, problems)
    elif any(key in entry for key in MIRROR_KEYS):
        problems.append((line, f"{', '.join(k for k in MIRROR_KEYS if k in entry)} goes with mirror-ports, "
                               "which is missing"))
    elif any(key in entry for key in REVERSE_KEYS):
        fields["host_listen"] = _read_host_listen(entry, fields, ends, line, problems)
    else:
        if "vsock-host-port" not in entry:
            problems.append((line, "missing key 'vsock-host-port'"))
        fields["peer"] = _read_peer(entry, ends, line, problems)
    errors.extend(f"{path}:{at}: {label}: {problem}" for at, problem in sorted(problems))
    if problems:  # no Tunnel, but what it claims still meets the others' claims (_check_unique)
        return Claims(fields.get("name"), line, _claims({**fields, **ends}))
    return Tunnel(line=line, **fields)


PEER_FIELDS = ("peer_address", "peer_port", "peer_socket", "peer_socket_mode")  # four keys, one Tunnel.peer
HOST_LISTEN_FIELDS = ("host_listen_address", "host_socket_mode", "host_pipe_sddl")  # three keys, one host_listen


def _read_host_listen(entry, fields, ends, line, problems):
    """A reverse tunnel: the host listens on host-listen-address, the peer on vsock-peer-port and
    dials the upstream inside the VM. Returns the host's endpoint."""
    mixed = [key for key in FORWARD_KEYS if key in entry]
    if mixed:
        problems.append((line, f"a reverse tunnel (it has {', '.join(k for k in REVERSE_KEYS if k in entry)}) "
                               f"takes none of the forward keys (found {', '.join(mixed)})"))
    for key in ("vsock-peer-port", "host-listen-address"):
        if key not in entry:
            problems.append((line, f"missing key '{key}' (a reverse tunnel needs it)"))
    if isinstance(fields.get("upstream"), PipeEndpoint):
        problems.append((entry.key_lines["upstream-server-address"], "key 'upstream-server-address': a reverse "
                         "tunnel's upstream is inside the VM: expected IP:port or unix:///path, not npipe://"))
    listen, mode = ends["host_listen_address"], ends["host_socket_mode"]
    if mode is not None and listen is not None and not isinstance(listen, UnixEndpoint):
        problems.append((entry.key_lines["host-socket-mode"], "host-socket-mode goes with a unix:/// "
                         "host-listen-address"))
    sddl = ends["host_pipe_sddl"]
    if sddl is not None and listen is not None and not isinstance(listen, PipeEndpoint):
        problems.append((entry.key_lines["host-pipe-sddl"], "host-pipe-sddl goes with an npipe:// "
                         "host-listen-address"))
    if isinstance(listen, UnixEndpoint):
        return UnixEndpoint(listen.path, mode or 0o600)
    if isinstance(listen, PipeEndpoint):
        return PipeEndpoint(listen.path, sddl)
    return listen


def _read_mirror(entry, fields, ends, line, problems):
    """A mirror: the host listens, on host-listen-address (an IP; 127.0.0.1 if not given), for each VM
    listener on mirror-ports, and the peer dials it in the VM. Returns the host's endpoint (port 0:
    each mirrored port has its own)."""
    foreign = [key for key in (*FORWARD_KEYS, "upstream-server-address", "host-socket-mode", "host-pipe-sddl",
                               "upstream-proxy-protocol") if key in entry]
    if foreign:
        problems.append((line, f"a mirror (it has mirror-ports) takes none of {', '.join(foreign)}: each VM "
                               "port is its own upstream"))
    if "vsock-peer-port" not in entry:
        problems.append((line, "missing key 'vsock-peer-port' (a mirror needs it: its control stream and legs)"))
    if "host-listen-address" not in entry:
        return TcpEndpoint("127.0.0.1", 0)
    return ends["host_listen_address"]  # _mirror_listen's, or None where it had a problem


def _read_peer(entry, fields, line, problems):
    """The peer listens on peer-address + peer-port, or on peer-socket: one form, never both.
    `fields` holds the four keys' values, converted; returns the endpoint they make."""
    tcp = [key for key in ("peer-address", "peer-port") if key in entry]
    unix = [key for key in ("peer-socket", "peer-socket-mode") if key in entry]
    if tcp and unix == ["peer-socket-mode"]:
        problems.append((line, "peer-socket-mode goes with peer-socket, not with peer-address and peer-port"))
    elif tcp and unix:
        problems.append((line, f"give either peer-address and peer-port, or peer-socket, not both "
                               f"(found {', '.join(tcp + unix)})"))
    elif unix:
        if "peer-socket" not in entry:
            problems.append((line, "peer-socket-mode goes with peer-socket, which is missing"))
        elif fields.get("peer_socket"):
            return UnixEndpoint(fields["peer_socket"], fields.get("peer_socket_mode") or 0o600)
    elif len(tcp) < 2:
        missing = " and ".join(f"'{key}'" for key in ("peer-address", "peer-port") if key not in entry)
        problems.append((line, f"missing key {missing} (or give 'peer-socket' instead)"))
    elif fields.get("peer_address") and fields.get("peer_port"):
        return TcpEndpoint(fields["peer_address"], fields["peer_port"])
    return None


@dataclass(frozen=True)
class Claims:
    """What an entry with problems claims that no other entry may (its Tunnel was not made)."""
    name: object
    line: int
    claims: tuple


def _claims(values):
    """(what, key) pairs an entry claims, from its converted values (None where a key was missing or bad)."""
    pairs = [(f"name {values.get('name')!r}", ("name", values.get("name"))),
             (f"handshake-port {values.get('handshake_port')}", ("vsock", values.get("handshake_port")))]
    for key, attr in (("vsock-host-port", "vsock_host_port"), ("vsock-peer-port", "vsock_peer_port")):
        pairs.append((f"{key} {values.get(attr)}", ("vsock", values.get(attr))))
    peer = values.get("peer")
    port = peer.port if isinstance(peer, TcpEndpoint) else values.get("peer_port")
    path = peer.path if isinstance(peer, UnixEndpoint) else values.get("peer_socket")
    pairs += [(f"peer-port {port}", ("peer", port)), (f"peer-socket {path}", ("peer", path))]
    listen = values.get("host_listen") or values.get("host_listen_address")
    if values.get("mirror_ports") is None:  # a mirror's host ports depend on the VM
        pairs.append((f"host-listen-address {listen}", ("host-listen", str(listen) if listen else None)))
    return tuple((what, key) for what, key in pairs if key[1] is not None)


def _check_unique(entries, path, errors):
    seen = {}
    for entry in entries:
        claims = entry.claims if isinstance(entry, Claims) else _claims(vars(entry))
        for what, key in claims:
            if not isinstance(key[1], (int, str)):
                continue  # a bad value: its own error says so
            if key in seen:
                errors.append(f"{path}:{entry.line}: tunnel {entry.name!r}: {what} "
                              f"is already used by tunnel {seen[key].name!r} (line {seen[key].line})")
            seen.setdefault(key, entry)


# --------------------------------------------------------------------------
# 3. Sockets: listening and dialling, name lookups, errors
# --------------------------------------------------------------------------

def listen_socket(family, address, prepare=None, new_socket=gevent.socket.socket):
    """A listening socket (gevent's, unless `new_socket` makes another); `prepare(sock)` runs before the bind."""
    sock = new_socket(family, socket.SOCK_STREAM)
    try:
        if prepare:
            prepare(sock)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def reuse_address(sock):
    # A restarted end must be able to listen again while old connections linger in TIME_WAIT.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)


def prepare_tcp_listener(sock):
    """Reusable at once, and tuned once for every connection it will accept (tune_tcp)."""
    reuse_address(sock)
    tune_tcp(sock)


def listen_tcp(host, port):
    family = ip_family(host)
    if not _is_ip(host):  # through the resolver's threads: a slow DNS must not stop the loop
        family, _, _, _, (host, port, *_) = RESOLVER.resolve(host, port, CONNECT_TIMEOUT)[0]
    return listen_socket(family, (host, port), prepare_tcp_listener)


def listen_unix(path, mode=0o600):
    """Listen on a Unix socket file born with `mode`; a stale file is replaced, a live socket refused."""
    directory = os.path.dirname(path)
    if directory and not os.path.isdir(directory):
        raise OSError(errno.ENOENT, f"the directory {directory} does not exist")
    claim_socket_path(path)
    # umask, not a chmod after bind: no moment when others may connect.
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock = listen_socket(socket.AF_UNIX, path)
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise OSError(exc.errno, f"{_reason(exc)}{where_sockets_may_go()}", path) from None
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, mode)
    return sock


def where_sockets_may_go():
    """Why a socket file could not be made here, when a systemd sandbox is the likely cause."""
    runtime = os.environ.get("RUNTIME_DIRECTORY")  # systemd sets it for a unit with RuntimeDirectory=
    if runtime:
        first = runtime.split(":")[0]  # systemd lists several directories with colons
        return f" (this service may create files only under {first}, its RuntimeDirectory: put the socket there)"
    return ""


def claim_socket_path(path):
    """Remove a stale Unix socket file at `path`; refuse one that a live process listens on."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise OSError(errno.EEXIST, "a file that is not a socket is in the way", path)
    except FileNotFoundError:
        return
    try:  # through the loop, and bounded: a live listener that does not accept must not freeze us
        dial(socket.AF_UNIX, path, PROBE_TIMEOUT).close()
    except FileNotFoundError:
        return
    except ConnectionRefusedError:
        remove_socket_file(path)
        return
    except socket.timeout:
        raise OSError(errno.EADDRINUSE, "another process listens on this socket (and does not accept)", path) from None
    raise OSError(errno.EADDRINUSE, "another process is listening on this socket", path)


def remove_socket_file(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


KEEPALIVE = {"TCP_KEEPIDLE": 60, "TCP_KEEPINTVL": 10, "TCP_KEEPCNT": 6}  # a dead peer is found in 2 minutes


def tune_tcp(sock, keepalive=True):
    """Small writes go out at once (Nagle would hold 64-byte replies back) and dead peers are found
    (`keepalive`: a loopback peer never vanishes unseen, so it is spared the four system calls).
    Other kinds of socket are left as they are. A listener tuned here passes all of it on to the
    connections it accepts (Linux, Windows and the BSDs copy these options at accept)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if not keepalive:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in KEEPALIVE.items():
        try:
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
        except (AttributeError, OSError):
            pass  # older Windows (and Wine) lack these: the system's keepalive timing applies


def dial(family, address, timeout):
    """A connected gevent socket; blocking afterwards (timeouts belong to the connect only)."""
    sock = gevent.socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == getattr(socket, "AF_UNIX", None):  # (Windows' Python may have none)
            _connect_unix(sock, address, timeout)
        else:
            sock.settimeout(timeout)
            sock.connect(address)
        sock.settimeout(None)
    except BaseException:
        sock.close()
        raise
    tune_tcp(sock, keepalive=not (isinstance(address, tuple) and is_loopback(address[0])))
    return sock


def _connect_unix(sock, path, timeout):
    """Connect a Unix socket, waiting with pauses while the listener's queue is full.

    Then a non-blocking AF_UNIX connect fails with EAGAIN, and the socket is writable all the while,
    so gevent's connect (which waits for writability) tries again at once, for ever: a docker.sock
    that had stopped accepting took a whole core for the connect-timeout (3.0 s of CPU in 3 s).
    """
    deadline, pause = time.monotonic() + timeout, 0.005
    sock.settimeout(0.0)
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout(errno.ETIMEDOUT, "timed out: the socket's listen queue stayed full") from None
        gevent.sleep(min(pause, left))
        pause = min(pause * 2, 0.1)


def connect_tcp(host, port, timeout=CONNECT_TIMEOUT):
    """Dial TCP, resolving and connecting within `timeout` seconds in all.

    IP literals skip the resolver, which costs a thread round trip. A name's
    addresses are tried in the resolver's order, each with what is left of the
    time; the error of the last one is raised.
    """
    if _is_ip(host):
        return dial(ip_family(host), (host, port), timeout)
    deadline = time.monotonic() + timeout
    problem = None
    for family, _, _, _, address in RESOLVER.resolve(host, port, timeout):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            return dial(family, address, left)
        except OSError as exc:
            problem = exc
    raise problem or socket.timeout(f"connecting to {host} timed out")


class Resolver:
    """Host names to addresses, each lookup bounded by the caller's time and
    no name's lookups ever queued behind another's.

    The C library's getaddrinfo cannot be cancelled, and gevent's default
    resolver runs it in the hub's shared pool of 10 threads. Measured with a
    DNS server that never answers (resolver timeout:2 attempts:1, connect-timeout
    1): 50 clients of one tunnel were reset after 2 / 6 / 10 s (min / median /
    max), and a healthy tunnel to `localhost` stalled 9.9 s behind them. So:
    one lookup per name at a time, in a pool of its own, that every caller of
    that name waits on with its own deadline. A silent DNS then holds one
    thread per name (names come only from the config), and `localhost` or a
    name in the hosts file, answered from files, never waits behind it.
    """

    def __init__(self):
        self.pool = gevent.threadpool.ThreadPool(256)  # threads start on demand: one per name in flight
        self.lookups = {}  # (host, port): the lookup in flight

    def resolve(self, host, port, timeout):
        """getaddrinfo's TCP answers for (host, port), or OSError saying what went wrong."""
        key = (host, port)
        lookup = self.lookups.get(key)
        if lookup is None:
            lookup = vtunnel_npipe.spawn_in_thread(self.pool, socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM)
            self.lookups[key] = lookup
            lookup.rawlink(lambda _: self.lookups.pop(key, None))
        gevent.wait([lookup], timeout=timeout)
        if not lookup.ready():
            raise socket.timeout(errno.ETIMEDOUT, f"resolving {host} timed out")
        try:
            return vtunnel_npipe.outcome(lookup)
        except OSError as exc:
            raise OSError(exc.errno, f"resolving {host}: {_reason(exc)}") from None


RESOLVER = Resolver()


def connect_unix(path, timeout=CONNECT_TIMEOUT):
    return dial(socket.AF_UNIX, path, timeout)


def _reason(exc):
    """A short, human account of why an operation failed."""
    if isinstance(exc, OSError) and exc.strerror:  # a timeout may say what timed out
        return exc.strerror[0].lower() + exc.strerror[1:]
    if isinstance(exc, (socket.timeout, gevent.Timeout)):
        return "timed out"
    return str(exc) or type(exc).__name__


def unsent_bytes(sock):
    """Bytes the kernel still holds for a socket's other end (Linux: SIOCOUTQ), or None where unknown."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (OSError, NameError, AttributeError, ValueError):
        return None


def abort(sock):
    """Close so that the other end sees a failure, not a clean end of stream.

    A failure must travel as a failure: a FIN after a truncated transfer
    would look like a complete one. On TCP (and Hyper-V) SO_LINGER 0 makes the
    close a reset. A Unix socket has no reset, and on AF_VSOCK SO_LINGER makes
    close wait instead (and Python's setsockopt takes only integers there):
    those close outright, which a vtunnel at the far end tells from a
    half-close (see closed_outright).
    """
    if getattr(sock, "family", None) not in TELLS_CLOSE_FROM_HALF_CLOSE:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (OSError, AttributeError):
            pass
    sock.close()


def describe_socket(sock):
    """'local -> remote' addresses of a socket, for debug lines (a named pipe: its path)."""
    try:
        return f"{_address(sock.getsockname())} -> {_address(sock.getpeername())}"
    except (OSError, AttributeError):
        return str(getattr(sock, "path", "?"))


def _address(address):
    if isinstance(address, tuple) and len(address) >= 2:  # (host, port, ...); AF_VSOCK: (cid, port)
        return format_host_port(str(address[0]), address[1])
    return address.decode(errors="replace") if isinstance(address, bytes) else str(address or "unnamed")


# --------------------------------------------------------------------------
# 4. Endpoints and transports: where each side of a connection is
# --------------------------------------------------------------------------

class Endpoint:
    """Where one side of a connection is: listened on, or dialled.

    Every kind vtunnel carries between is one: a TCP address, a Unix socket, a
    Windows named pipe (upstreams only) and a vsock port as a transport reaches
    it (VsockEndpoint: AF_VSOCK, AF_HYPERV and the emulated tcp:/unix:). Peer
    and Host hold only endpoints. A new kind implements:

    - listen() -> a listening socket (or ThreadedListener) for Service.start_server;
    - connect(timeout) -> a connected stream with recv, sendall, shutdown, settimeout
      and close, for the pump (a gevent socket, or vtunnel_npipe's SocketStream or PipeStream);
    - close_listener() -> remove what listen() left behind, such as a socket file;
    - __str__ -> how logs and errors name it.
    """
    is_loopback = False  # reachable only from this machine

    def listen(self):
        raise StartupError(f"{self}: vtunnel cannot listen here")

    def connect(self, timeout):
        raise NotImplementedError

    def close_listener(self):
        pass


@dataclass(frozen=True)
class TcpEndpoint(Endpoint):
    """A TCP address: where the peer listens, or an upstream the host dials."""
    host: str
    port: int

    def __str__(self):
        return format_host_port(self.host, self.port)

    @property
    def is_loopback(self):
        return is_loopback(self.host)

    def listen(self):
        return listen_tcp(self.host, self.port)

    def connect(self, timeout):
        return connect_tcp(self.host, self.port, timeout)


@dataclass(frozen=True)
class UnixEndpoint(Endpoint):
    """A Unix socket: where the peer listens (peer-socket), or an upstream (unix:///path)."""
    path: str
    mode: int = 0o600

    def __str__(self):
        return "unix://" + self.path

    is_loopback = True  # only processes on this machine, within the file's permissions

    def listen(self):
        return listen_unix(self.path, self.mode)

    def connect(self, timeout):
        return connect_unix(self.path, timeout)

    def close_listener(self):
        remove_socket_file(self.path)


@dataclass(frozen=True)
class PipeEndpoint(Endpoint):
    """A Windows named pipe, npipe:////./pipe/NAME: an upstream, or where a reverse tunnel's host listens."""
    path: str  # Windows form: \\.\pipe\NAME
    sddl: str = None  # where vtunnel listens: who may open it; None: only the user running vtunnel

    is_loopback = True  # the pipes vtunnel listens on reject remote clients

    def __str__(self):
        return "npipe://" + self.path.replace("\\", "/")

    def listen(self):
        return vtunnel_npipe.PipeListener(self.path, self.sddl)

    def connect(self, timeout):
        return vtunnel_npipe.connect(self.path, timeout)


class Transport:
    """How vsock ports are reached: endpoint(port) is the Endpoint for one of them.

    The real families (AF_VSOCK, AF_HYPERV) and the emulated ones (TCP,
    Unix sockets) share the methods below. A subclass names its family and
    turns a port into an address (listen_address, dial_address), and may
    prepare or clean up a listener; HyperVTransport also keeps its sockets
    blocking, in threads.
    """
    family = None
    max_port = 0xFFFFFFFF
    per_vm = False  # True where each VM has its own addresses, found by handshakes (Hyper-V)
    vm_id = None  # the VM a per-VM transport reaches, once known

    def endpoint(self, port):
        return VsockEndpoint(self, port)

    def for_vm(self, vm_id):
        return self

    def listen_address(self, port):
        raise NotImplementedError

    def dial_address(self, port):
        raise NotImplementedError

    def refuses(self, address):
        """Why a leg accepted from `address` must be closed before anything is dialled, or None.
        The emulated transports cannot tell (tcp: admits any local process; unix: whoever the
        socket file's mode lets in, the owner only)."""
        return None

    def check_available(self):
        if self.family is None:
            raise StartupError(f"the {self} transport is not available on this platform")

    def listen(self, port):
        return listen_socket(self.family, self.listen_address(port), partial(self.prepare_listener, port=port))

    def connect(self, port, timeout=CONNECT_TIMEOUT):
        return dial(self.family, self.dial_address(port), timeout)

    def prepare_listener(self, sock, port):
        pass

    def close_listener(self, port):
        pass


@dataclass(frozen=True)
class VsockEndpoint(Endpoint):
    """Vsock port `port`, as `transport` reaches it."""
    transport: Transport
    port: int

    def __str__(self):
        return f"{self.transport} port {self.port}"

    def listen(self):
        return self.transport.listen(self.port)

    def connect(self, timeout):
        return self.transport.connect(self.port, timeout)

    def close_listener(self):
        self.transport.close_listener(self.port)


class VsockTransport(Transport):
    family = getattr(socket, "AF_VSOCK", None)

    def __init__(self, cid=VMADDR_CID_HOST):
        self.cid = cid

    def __str__(self):
        return "vsock" if self.cid == VMADDR_CID_HOST else f"vsock:{self.cid}"

    def listen_address(self, port):
        return (VMADDR_CID_ANY, port)

    def dial_address(self, port):
        return (self.cid, port)

    def refuses(self, address):
        """Only the other end's VM may dial a leg: at the host, the guest's CID (--vsock vsock:CID);
        at the peer, the host's (2, unless --vsock vsock:CID names another). Any other VM on the
        machine, and any local process (CID 1, vsock_loopback), would otherwise reach the upstream."""
        cid = address[0] if isinstance(address, tuple) and address else None
        return None if cid == self.cid else f"a leg from CID {cid}, not from CID {self.cid}"


class TcpTransport(Transport):
    """Emulated vsock: vsock port N is TCP port N on one host (loopback for tests)."""
    max_port = 65535

    def __init__(self, host):
        self.host = host
        self.family = ip_family(host)

    def __str__(self):
        return f"tcp:{self.host}"

    def listen_address(self, port):
        return (self.host, port)

    dial_address = listen_address

    def prepare_listener(self, sock, port):
        prepare_tcp_listener(sock)


class UnixTransport(Transport):
    """Emulated vsock: vsock port N is the Unix socket PREFIX_N (Firecracker's naming)."""
    family = getattr(socket, "AF_UNIX", None)

    def __init__(self, prefix):
        self.prefix = prefix

    def __str__(self):
        return f"unix:{self.prefix}"

    def listen_address(self, port):
        return f"{self.prefix}_{port}"

    dial_address = listen_address

    def listen(self, port):
        """A leg's socket file admits its owner only (0600): anyone who can connect to it reaches
        the tunnel's far end."""
        return listen_unix(self.listen_address(port), 0o600)

    def close_listener(self, port):
        remove_socket_file(self.listen_address(port))


class HybridTransport(UnixTransport):
    """The host's side of Firecracker's and Cloud Hypervisor's vsock ("hybrid vsock"): their VMM stands
    for the guest's vsock on the host with Unix sockets. Guest port P is dialled through the VMM's own
    socket PATH (its uds_path): connect, send `CONNECT P\n`, read its one-line answer, `OK <port>\n`,
    and the stream is then the guest's. A guest's connection to host port P arrives on PATH_P, where
    vtunnel listens as unix:PREFIX does. Who may dial a leg: the VMM, and the owner (0600)."""

    def __str__(self):
        return f"hybrid:{self.prefix}"

    def connect(self, port, timeout=CONNECT_TIMEOUT):
        deadline = time.monotonic() + timeout
        sock = dial(self.family, self.prefix, timeout)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(b"CONNECT %d\n" % port)
            answer = self._read_answer(sock, port)
            sock.settimeout(None)
        except socket.timeout:
            sock.close()
            raise socket.timeout(errno.ETIMEDOUT, f"the VMM at {self.prefix} did not answer CONNECT {port} "
                                 f"within {timeout:g}s") from None
        except BaseException:
            sock.close()
            raise
        if not answer.startswith(b"OK "):
            sock.close()
            raise ConnectionRefusedError(errno.ECONNREFUSED, f"the VMM answered {_show_line(answer)} to CONNECT {port}")
        return sock

    @staticmethod
    def _read_answer(sock, port):
        """The VMM's answer line, and not a byte more: the guest's bytes follow it at once, and are the
        pump's. One byte per read, about ten per connection."""
        line = b""
        while not line.endswith(b"\n") and len(line) < 64:
            byte = sock.recv(1)
            if not byte:
                raise ConnectionRefusedError(errno.ECONNREFUSED, f"the VMM closed the connection after CONNECT "
                                             f"{port}{' (answering ' + _show_line(line) + ')' if line else ''}: "
                                             f"nothing listens on vsock port {port} in the guest")
            line += byte
        return line


def _show_line(line):
    return repr(line.rstrip(b"\n").decode("ascii", "replace"))


def parse_transport(spec):
    """--vsock TRANSPORT -> a Transport."""
    kind, _, arg = spec.partition(":")
    if kind == "vsock":
        if arg and not arg.isdigit():
            raise UsageError(f"--vsock {spec}: expected vsock:CID with a numeric CID")
        return VsockTransport(int(arg) if arg else VMADDR_CID_HOST)
    if kind == "hyperv" and not arg:
        return HyperVTransport()
    if kind == "tcp" and arg:
        host = arg[1:-1] if arg.startswith("[") and arg.endswith("]") else arg
        if not _is_ip(host):
            raise UsageError(f"--vsock {spec}: expected tcp:IP, such as tcp:127.0.0.1")
        return TcpTransport(host)
    if kind == "unix" and arg:
        return UnixTransport(arg)
    if kind == "hybrid":
        if not arg:
            raise UsageError(f"--vsock {spec}: expected hybrid:PATH, the VMM's vsock socket (Firecracker's "
                             "uds_path, Cloud Hypervisor's --vsock socket=)")
        return HybridTransport(arg)
    raise UsageError(f"--vsock {spec}: expected vsock, vsock:CID, hyperv, tcp:IP, unix:PREFIX or hybrid:PATH")


def default_transport():
    return HyperVTransport() if sys.platform == "win32" else VsockTransport()


# --------------------------------------------------------------------------
# 5. Hyper-V sockets (the Windows host): overlapped I/O, no thread per connection
# --------------------------------------------------------------------------

def hyperv_service_id(port):
    """The Hyper-V service GUID that stands for vsock port `port`."""
    return HYPERV_SERVICE_TEMPLATE.format(port=port)


class HyperVTransport(Transport):
    """AF_HYPERV: vsock port N is the service GUID {N:08X}-FACB-11E6-BD58-64006A7986D3 of one VM.

    A connected Hyper-V socket reads and writes with overlapped calls that complete through the
    process's I/O completion port (vtunnel_npipe.SocketStream), so an idle connection holds no thread.
    Its connect and accept block in threads (vtunnel_npipe.dials; a listener keeps one of its own).
    """
    family = getattr(socket, "AF_HYPERV", None)
    protocol = getattr(socket, "HV_PROTOCOL_RAW", 1)
    per_vm = True  # the VM is found by a handshake, and found again when it changes

    def __init__(self, vm_id=None):
        self.vm_id = vm_id

    def __str__(self):
        return "hyperv" if self.vm_id is None else f"hyperv:{self.vm_id}"

    def for_vm(self, vm_id):
        return type(self)(vm_id)

    def check_available(self):
        if sys.platform == "win32" and sys.version_info < (3, 12):
            raise StartupError("Hyper-V sockets need Python 3.12 or newer")
        super().check_available()

    def listen_address(self, port):
        return (self.vm_id, hyperv_service_id(port))

    dial_address = listen_address

    def listen(self, port):
        blocking = partial(socket.socket, proto=self.protocol)  # see the class's docstring
        return ThreadedListener(listen_socket(self.family, self.listen_address(port), self.set_options, blocking))

    def connect(self, port, timeout=CONNECT_TIMEOUT):
        sock = socket.socket(self.family, socket.SOCK_STREAM, self.protocol)
        try:
            self.set_options(sock, connect_timeout=timeout)
            with gevent.Timeout(timeout + 1, socket.timeout("timed out")):
                vtunnel_npipe.run_in_thread(vtunnel_npipe.dials(), sock.connect, self.dial_address(port))
        except BaseException:
            sock.close()
            raise
        return overlapped_stream(sock)

    def set_options(self, sock, connect_timeout=None):
        if connect_timeout is not None:  # Hyper-V's own connect timeout is 90 s by default
            sock.setsockopt(self.protocol, socket.HVSOCKET_CONNECT_TIMEOUT, int(connect_timeout * 1000))
        sock.setsockopt(self.protocol, socket.HVSOCKET_CONNECTED_SUSPEND, 1)  # survive the host sleeping


def overlapped_stream(sock):
    """A connected Hyper-V socket as the pump's stream: on Windows, overlapped reads and writes through
    the completion port (vtunnel_npipe.SocketStream); elsewhere, where only the tests' stand-in family
    exists (FakeHyperV, loopback TCP), a gevent socket."""
    if vtunnel_npipe.AVAILABLE:
        return vtunnel_npipe.SocketStream(sock)
    return gevent.socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach())


class ThreadedListener:
    """A blocking listening socket that ThreadedServer accepts from in a thread of its own, so no
    accept waits behind another tunnel's dials."""

    def __init__(self, sock):
        self.sock = sock
        self.thread = gevent.threadpool.ThreadPool(1)

    def accept(self):
        conn, address = vtunnel_npipe.run_in_thread(self.thread, self.sock.accept)
        return overlapped_stream(conn), address

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept
        except OSError:
            pass
        self.sock.close()
        self.thread.kill()


# --------------------------------------------------------------------------
# 6. The pump: two endpoints, two greenlets, every byte
# --------------------------------------------------------------------------

# Families with no reset, where a close outright is how a vtunnel at the far end tells a failure
TELLS_CLOSE_FROM_HALF_CLOSE = {getattr(socket, name) for name in ("AF_UNIX", "AF_VSOCK") if hasattr(socket, name)}


class IdleTimeout(OSError):
    """No byte moved in either direction for the tunnel's idle-timeout."""


class Stopped(OSError):
    """The process stopped, and its grace period ended, before the connection did."""


class TunnelRemoved(gevent.GreenletExit):
    """What kills a connection of a tunnel a reload removed, once its grace period is over."""
    culprit = "removed by a reload"


class PortGone(gevent.GreenletExit):
    """What kills a connection of a mirrored port the VM stopped listening on, once the grace period is over."""
    culprit = "its VM port closed"


def closed_outright(sock):
    """After an end of stream: whether the far end closed the socket rather than half-closing it.

    A zero-length send moves no byte, but on a Unix socket or AF_VSOCK it fails
    with EPIPE once the far end has closed outright (for AF_UNIX the far end's
    close shuts down our sending side; for AF_VSOCK it sets the peer's receive
    shutdown). Over TCP it always succeeds: TCP carries resets of its own.
    """
    if getattr(sock, "family", None) not in TELLS_CLOSE_FROM_HALF_CLOSE:
        return False
    try:
        sock.send(b"")
    except OSError:
        return True
    return False


def is_polled(stream):
    """Whether a stream is a socket gevent polls: the pump may then wait for it (wait_ready), send
    with send() (Pump._send) and splice it. The Windows streams (vtunnel_npipe) are not."""
    return isinstance(stream, gevent.socket.socket)


def overlapped_on_windows(stream):
    """On Windows, a gevent socket as a vtunnel_npipe.SocketStream, whose reads and writes complete
    through the completion port; anything else as it is. gevent's polling made every transfer slower
    as idle sockets added up (Wine, 64 MiB echoed beside 2,000 idle polled sockets: 1.5x the time it
    took beside none; beside 2,000 idle overlapped ones: the same time)."""
    if vtunnel_npipe.AVAILABLE and is_polled(stream):
        return vtunnel_npipe.SocketStream(socket.socket(fileno=stream.detach()))
    return stream


class Pump:
    """Carries bytes both ways between two connected endpoints.

    An endpoint is anything with recv, sendall, shutdown, settimeout and
    close: a socket, or a named pipe from vtunnel_npipe. Each direction
    copies until end of stream and then shuts down the write side of its
    destination, so half-closes travel through. The first error in either
    direction resets both endpoints, which also wakes the other direction.
    No buffer outlives the chunk in flight: a reader that stops reading
    stalls the writer on the other side (backpressure), it never grows one.

    Each direction's greenlet owns it, but the bytes of chatty traffic move
    without it: while the greenlet waits for a message, the event loop's
    callback carries each one that comes, and wakes the greenlet only when
    the traffic stops looking chatty (SmallMessages).
    """

    def __init__(self, left, right, idle_timeout=None, leg=None):
        self.left, self.right = left, right
        self.leg = leg  # the end that is a tunnel leg (a vtunnel at its far end), if it can tell an abort
        self.half_closed = set()  # the ends this pump has shut down for writing
        self.sent = [0, 0]  # bytes left -> right, right -> left
        self.failure = None  # ("left", "right", "shutdown" or "vtunnel", exception) of the first error
        self.started_at = self.last_activity = time.monotonic()
        self.idle_timeout = idle_timeout
        if idle_timeout:
            left.settimeout(idle_timeout)
            right.settimeout(idle_timeout)
        self.splices = not idle_timeout and splice_pays(left, right)
        self._hub = gevent.get_hub()
        self._parked = [None, None]  # per direction: its SmallMessages while the greenlet waits in it

    def run(self):
        """Pump until both directions have ended or one has failed.

        Killed (the process stops, or a reload removed the tunnel, and the grace
        period is over), the pump fails too: a transfer cut short must not reach
        either side as a clean end.
        """
        back = gevent.spawn(self._direction, self.right, self.left, 1)
        try:
            self._direction(self.left, self.right, 0)
            back.join()
        except gevent.GreenletExit as exc:
            self._fail(getattr(exc, "culprit", "shutdown"), Stopped(errno.ECONNABORTED, "grace period over"))
            raise
        finally:
            back.kill(block=False)
            self.left.close()
            self.right.close()
        return self

    @property
    def elapsed(self):
        return time.monotonic() - self.started_at

    def _direction(self, src, dst, direction):
        """Carry src to dst until the end. A bug met on the way fails this connection, loudly:
        a direction that died quietly would leave the other one waiting for ever."""
        try:
            if not (self.splices and self._splice(src, dst, direction)):
                self._copy(src, dst, direction)
        except Exception as exc:
            self._bug(exc)

    def _bug(self, exc):
        log.exception("unexpected error carrying bytes: ending this connection in failure")
        self._fail("vtunnel", exc)

    def _copy(self, src, dst, direction):
        waits, sends = is_polled(src), is_polled(dst)
        sent, size, drained, in_a_row, streak = self.sent, SMALL_READ, False, 0, Streak()
        small = SmallMessages(self, src, dst, direction, streak) if waits and sends and CALLBACKS_CARRY else None
        try:
            while True:
                culprit = src
                if streak.bulk and OFF_LOOP.takes(src, dst):
                    if self._off_loop(src, dst, direction, splicing=False):
                        return
                    size, drained, in_a_row = SMALL_READ, True, 0
                    streak.reset()
                # After a short read the kernel's buffer is empty: waiting first spares a recv that
                # would only fail (one system call and one Python exception per message). After a
                # run of full reads (where no thread could take the direction), waiting lets the
                # other connections have their turn.
                wait_first = waits and (drained or in_a_row >= READS_PER_TURN)
                if wait_first and small:
                    outcome = small.wait(size)
                    if outcome == "failed":
                        return
                    if outcome == "ended":
                        break
                    drained, in_a_row = False, 0  # "busy": read on without waiting
                    continue
                data = self._receive(src, size, wait_first)
                in_a_row = 0 if wait_first else in_a_row + 1
                if not data:
                    break
                culprit = dst
                if sends:
                    self._send(dst, data, direction)
                else:
                    dst.sendall(data)
                    sent[direction] += len(data)
                self.last_activity = now = time.monotonic()
                streak.add(len(data), now)
                drained = len(data) < size
                # recv allocates `size` bytes whatever arrives: small for chatty traffic, large for bulk.
                if len(data) == size:
                    size = min(size * 4, CHUNK_SIZE)
                elif len(data) < size // 16:
                    size = max(size // 4, SMALL_READ)
        except socket.timeout:
            self._fail(culprit, self._idle())
        except OSError as exc:
            self._fail(culprit, exc)
        else:
            self._end(src, dst)
        finally:
            if small:
                small.close()

    def _park(self, waiter):
        """What the waiter is given; with an idle-timeout, raise socket.timeout once no byte has moved
        either way for that long (the other direction's bytes count too)."""
        if not self.idle_timeout:
            return waiter.get()
        while True:
            with gevent.Timeout(self.last_activity + self.idle_timeout - time.monotonic(), False):
                return waiter.get()
            if time.monotonic() - self.last_activity >= self.idle_timeout:
                raise socket.timeout(errno.ETIMEDOUT, "timed out")

    def _idle(self):
        return IdleTimeout(errno.ETIMEDOUT, f"idle for {self.idle_timeout:g}s")

    def _off_loop(self, src, dst, direction, splicing):
        """Hand a bulk direction to a thread (OffLoop): True once the direction is over (ended, or
        failed here or elsewhere), False when it came back quiet and the loop carries it again."""
        outcome = OFF_LOOP.carry(self, src, dst, direction, splicing)
        if outcome in ("quiet", "turn over"):
            return False
        if outcome == "end":
            self._end(src, dst)
        elif outcome != "failed":  # the thread met the failure: (the end that failed, the error)
            self._fail(*outcome)
        return True

    def _send(self, dst, data, direction):
        """All of data to dst with send() (gevent's sendall asks the kernel for the socket's buffer size
        on every call, and one send() nearly always takes the whole chunk).

        With an idle-timeout, idle means no byte moved either way: a client that reads 4 KiB every
        50 ms is not idle, though the socket may not turn writable for seconds (the kernel waits for a
        third of its buffer to be free). So while the send waits, the bytes still queued in the
        kernel (unsent_bytes) going down count as activity too.
        """
        done, view, queued = 0, data, None
        while done < len(data):
            if self.idle_timeout:
                queued = unsent_bytes(dst)
            try:
                part = dst.send(view)
            except socket.timeout:
                self._moved_while_waiting(dst, queued)
                continue
            done += part
            self.sent[direction] += part
            if done < len(data):
                self.last_activity = time.monotonic()
                view = memoryview(data)[done:]

    def _moved_while_waiting(self, dst, queued_before):
        """After a wait for dst: count the kernel sending bytes as activity, else raise if idle."""
        queued = unsent_bytes(dst)
        if queued is not None and queued_before is not None and queued < queued_before:
            self.last_activity = time.monotonic()
        elif time.monotonic() - self.last_activity >= self.idle_timeout:
            raise socket.timeout(errno.ETIMEDOUT, "timed out")

    def _receive(self, src, size, wait_first):
        """Up to `size` bytes from src (a gevent socket if `wait_first`: wait until it is readable)."""
        while True:
            try:
                if wait_first:
                    wait_ready(src)
                return src.recv(size)
            except socket.timeout:
                # A quiet direction is not idle while the other one moves bytes.
                if not self.idle_timeout or time.monotonic() - self.last_activity >= self.idle_timeout:
                    raise

    def _splice(self, src, dst, direction):
        """Linux: the same copy through a kernel pipe, so the bytes never enter Python.

        A pipe is borrowed from PIPES only while bytes are in flight and given back once it is
        empty again, so an idle connection holds none. Returns False where the kernel lends no
        pipe or will not splice this pair: the caller copies from there on, having lost nothing.
        """
        pipe, drained, streak = None, True, Streak()
        small = SmallMessages(self, src, dst, direction, streak)
        try:
            while True:
                culprit = src
                if streak.bulk and OFF_LOOP.takes(src, dst):
                    if self._off_loop(src, dst, direction, splicing=True):
                        return True
                    drained = True
                    streak.reset()
                if drained:  # wait holding no pipe, and copy what comes meanwhile in small messages
                    outcome = small.wait(SMALL_READ)
                    if outcome == "failed":
                        return True
                    if outcome == "ended":
                        break
                pipe = PIPES.take()
                if pipe is None:
                    return False
                moved = _splice_once(src, src.fileno(), pipe[1], CHUNK_SIZE)
                if not moved:  # the end of src (0), or a socket the kernel cannot splice (None)
                    PIPES.give_back(pipe)  # empty
                    pipe = None
                    if moved is None:
                        return False
                    break
                drained = moved < CHUNK_SIZE  # as in _copy: then wait before trying
                streak.add(moved, time.monotonic())
                culprit = dst
                spliced = self._empty_pipe(pipe, dst, moved, direction)
                PIPES.give_back(pipe)
                pipe = None
                if not spliced:
                    return False
        except OSError as exc:
            self._fail(culprit, exc)
            return True
        finally:
            small.close()
            if pipe is not None:
                PIPES.discard(pipe)  # a failure may have left bytes in it
        self._end(src, dst)
        return True

    def _empty_pipe(self, pipe, dst, moved, direction):
        """Move the `moved` bytes in the pipe to dst; False if dst cannot take a splice (they were copied)."""
        while moved:
            sent = _splice_once(dst, pipe[0], dst.fileno(), moved, writing=True)
            if sent is None:
                while moved:
                    data = os.read(pipe[0], moved)
                    dst.sendall(data)
                    moved -= len(data)
                    self.sent[direction] += len(data)
                return False
            moved -= sent
            self.sent[direction] += sent
        return True

    def _end(self, src, dst):
        """src has ended: pass that on to dst, as a half-close, or as a failure if it stands
        for one. The last step of every direction, copied or spliced.

        A tunnel leg's far end is a vtunnel, which half-closes when its side ends
        cleanly and closes outright only when it fails or dies. Where the kernel
        cannot carry a reset (Unix sockets, AF_VSOCK), that is how a failure is told
        from an end of stream, and it is passed on as a failure.
        """
        if src is self.leg and src not in self.half_closed and closed_outright(src):
            self._fail(src, ConnectionResetError(errno.ECONNRESET, "closed outright: the other end failed"))
            return
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._fail(dst, exc)
            return
        self.half_closed.add(dst)

    def _fail(self, culprit, exc):
        if self.failure is None:
            self.failure = ({self.left: "left", self.right: "right"}.get(culprit, culprit), exc)
            for parked in self._parked:  # before the close: their descriptor numbers may be reused
                if parked:
                    parked.interrupt()
            abort(self.left)
            abort(self.right)


class Streak:
    """Bytes a direction has moved with no pause over OFF_LOOP_GAP: OFF_LOOP_AFTER of them make it bulk."""

    __slots__ = ("bytes", "last")

    def __init__(self):
        self.bytes, self.last = 0, 0.0

    def add(self, moved, now):
        self.bytes = self.bytes + moved if now - self.last <= OFF_LOOP_GAP else moved
        self.last = now

    @property
    def bulk(self):
        return self.bytes >= OFF_LOOP_AFTER

    def reset(self):
        self.bytes = 0


class SmallMessages:
    """One direction of a pump while its greenlet waits for src: the loop's own callback carries each
    message that comes, one read of up to `size` bytes from src and one send to dst, no greenlet woken.

    Waking a greenlet for every message costs two switches and the hub's bookkeeping, more than the
    read and the send: 64-byte round trips back to back through peer and host over tcp: (`tox -e
    bench`) took 1.90x socat's at the median with the greenlet woken for each message, 1.23x with
    this callback carrying them, and the relays' CPU per round trip fell from 214 to 112 us (socat's
    68). The greenlet is woken, and carries on, as soon as the traffic stops looking chatty: a read
    fills `size` or makes the direction bulk (Streak) ("busy": it reads on without waiting), dst takes
    part of a message (the greenlet sends the rest, then "busy"), src ends ("ended"), or either end
    fails ("failed", told to the pump by the callback).

    Reads and writes go straight to the descriptors (os.read, os.write: POSIX), which stay open while
    the watcher is started: Pump._fail interrupts it before it closes them.
    """

    __slots__ = ("pump", "src", "dst", "direction", "streak", "size", "watcher", "waiter", "rest", "fds")

    def __init__(self, pump, src, dst, direction, streak):
        self.pump, self.src, self.dst, self.direction, self.streak = pump, src, dst, direction, streak
        self.size, self.watcher, self.waiter, self.rest, self.fds = SMALL_READ, None, None, None, None

    def wait(self, size):
        """Until src stops looking chatty: "busy", "ended" or "failed"; socket.timeout once idle."""
        pump = self.pump
        if pump.failure is not None:  # the other direction failed, and closed both ends
            return "failed"
        if self.watcher is None:
            self.fds = (self.src.fileno(), self.dst.fileno())
            self.watcher, self.waiter = pump._hub.loop.io(self.fds[0], 1), gevent.hub.Waiter()
        self.size = size
        self.waiter.clear()
        pump._parked[self.direction] = self
        self.watcher.start(self._on_readable)
        try:
            outcome = pump._park(self.waiter)
        finally:
            self.watcher.stop()
            pump._parked[self.direction] = None
        if self.rest:
            return self._send_rest()
        return outcome

    def _on_readable(self):
        try:
            self._carry_one()
        except Exception as exc:  # as in Pump._direction: a bug must not leave the greenlet parked
            self.pump._bug(exc)

    def _carry_one(self):
        fd_in, fd_out = self.fds
        try:
            data = os.read(fd_in, self.size)
        except BlockingIOError:
            return
        except OSError as exc:
            return self.pump._fail(self.src, exc)  # which interrupts the wait
        if not data:
            return self._wake("ended")
        try:
            done = os.write(fd_out, data)
        except BlockingIOError:
            done = 0
        except OSError as exc:
            return self.pump._fail(self.dst, exc)
        pump = self.pump
        pump.sent[self.direction] += done
        pump.last_activity = now = time.monotonic()
        self.streak.add(done, now)
        if done < len(data):
            self.rest = data[done:]
            self._wake("busy")
        elif done == self.size or self.streak.bulk:
            self._wake("busy")

    def _wake(self, outcome):
        self.watcher.stop()
        self.waiter.switch(outcome)

    def _send_rest(self):
        rest, self.rest = self.rest, None
        try:
            self.pump._send(self.dst, rest, self.direction)
        except socket.timeout:
            self.pump._fail(self.dst, self.pump._idle())
            return "failed"
        except OSError as exc:
            self.pump._fail(self.dst, exc)
            return "failed"
        return "busy"

    def interrupt(self):
        """The pump has failed: stop carrying now, and wake the greenlet with "failed"."""
        self.watcher.stop()
        self.pump._hub.loop.run_callback(self.waiter.switch, "failed")

    def close(self):
        if self.watcher is not None:
            self.watcher.close()


CALLBACKS_CARRY = os.name == "posix"  # SmallMessages reads and writes descriptors with os.read and os.write

SPLICE = hasattr(os, "splice") and sys.platform.startswith("linux")  # Python 3.10+ on Linux


def splice_pays(left, right):
    """Whether to move bytes between two endpoints through kernel pipes rather than through Python.

    Only where a Unix socket is at one end: there splicing carried about 20%
    more with 15% less CPU in a side-by-side run. Between two TCP sockets it
    carried no more and cost the machine more CPU than copying (the zero-copy
    pages make loopback TCP's softirq work harder, charged to no process).
    """
    return (SPLICE and is_polled(left) and is_polled(right)
            and socket.AF_UNIX in (left.family, right.family))


def _splice_once(sock, fd_in, fd_out, size, writing=False):
    """One os.splice of up to `size` bytes, waiting for `sock` while it would block; None if the
    kernel cannot splice this kind of socket."""
    while True:
        try:
            return os.splice(fd_in, fd_out, size, flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                return None
            raise
        wait_ready(sock, writing)  # outside the except block: a parked greenlet keeps no exception alive


class OffLoop:
    """Threads that carry bulk directions beside the event loop, so that no connection queues behind them.

    One loop serves every connection of the process. A bulk direction used to copy up to four reads
    of 256 KiB per turn on it, and every round trip of every other connection waited behind those turns
    at both ends: with 4 iperf3 streams through one tunnel, a 64-byte round trip through another took
    8.1 ms at the median against socat's 0.86 ms (`bench.py --tables loaded`). A direction that has
    moved OFF_LOOP_AFTER bytes with no pause longer than OFF_LOOP_GAP is bulk: a thread takes it over
    and copies with blocking calls, which release the GIL, so the bulk bytes use the machine's other
    cores and the loop is left to interactive traffic. The thread gives the direction back once it has
    been quiet for OFF_LOOP_QUIET, so an idle connection holds no thread.

    Two things keep the threads from taking the loop's place in the queue (the same run, 4 and 16 bulk
    streams, round trip p50 against socat's): the GIL, which a waiting thread wins only by luck among
    many (16 threads each copying on its own: 3.5 ms; taking turns with the `turn` lock, so that the
    loop competes with one thread at most: 1.6 ms), and the CPU, which the kernel shares between threads
    alike (threads at nice 0: 1.6 ms with 4 streams; at OFF_LOOP_NICE: 0.78 ms, socat 0.97 ms).

    The thread works on duplicates of the two descriptors: the pump may close its sockets whenever a
    failure or a stop says so, and a descriptor number the thread still used could by then name a new
    connection. The thread looks every OFF_LOOP_POLL whether the pump has failed, and its duplicates
    keep the connection open until it has stopped (a reset the pump asked for is sent then).
    """

    def __init__(self, threads=OFF_LOOP_THREADS):
        self.threads, self._pool = threads, None
        self.running = 0  # directions a thread carries now
        self.carried = 0  # times a thread has taken a direction over
        self.turn = threading.Lock()
        self.wanted = 0.0  # when a bulk direction last found every thread taken

    def takes(self, src, dst):
        """Whether a thread is free for this pair now (both ends sockets the pump polls, on POSIX)."""
        if not (os.name == "posix" and is_polled(src) and is_polled(dst)):
            return False
        if self.running >= self.threads:
            self.wanted = time.monotonic()
            return False
        return True

    def others_wait(self):
        """Whether a bulk direction has found every thread taken lately: then each thread gives its
        direction back after OFF_LOOP_SLICE, so that 100 streams share 32 threads in turn (held for
        good, the 32 first streams took 0.35 of the mean's speed from the slowest of the rest)."""
        return time.monotonic() - self.wanted < OFF_LOOP_SLICE

    def carry(self, pump, src, dst, direction, splicing=False):
        """Carry src to dst in a thread until src is quiet ("quiet"), its turn is over while others wait
        ("turn over"), src ends ("end"), or the pump fails ("failed", or (the end that failed, the error)
        where the thread met the failure). The thread splices if the loop did (`splicing`), else copies."""
        try:
            ends = [socket.socket(fileno=os.dup(sock.fileno())) for sock in (src, dst)]
        except OSError:
            return "quiet"  # out of descriptors: the loop carries on copying
        if self._pool is None:
            # A thread that has carried nothing for a second ends: an idle process holds none.
            self._pool = gevent.threadpool.ThreadPool(self.threads, idle_task_timeout=1.0)
        self.running += 1
        self.carried += 1
        mover = ThreadSplice if splicing else ThreadCopy
        result = self._pool.spawn(carry_in_thread, pump, mover, *ends, direction)
        result.rawlink(self._finished)  # in the loop's thread, once the thread is done, killed or not
        outcome = result.get()
        if isinstance(outcome, tuple):  # the thread's own sockets, named for the pump
            return ({ends[0]: src, ends[1]: dst}[outcome[0]], outcome[1])
        return outcome

    def _finished(self, _result):
        self.running -= 1


class ThreadCopy:
    """How a thread moves bytes through Python: take() reads a chunk, give() sends part of it."""

    def __init__(self, src, dst):
        self.src, self.dst = src, dst
        self.buffer = bytearray(CHUNK_SIZE)
        self.view = memoryview(self.buffer)

    def take(self):
        return self.src.recv_into(self.buffer)

    def give(self, done, size):
        return self.dst.send(self.view[done:size])

    def close(self):
        self.view.release()


class ThreadSplice:
    """ThreadCopy's take and give through a kernel pipe of the thread's own (closed with it, with whatever a failure
    left in it), so the bytes never enter Python. Over a Unix-socket leg a thread that copied carried
    about half of what the loop spliced (`bench.py --tables loaded`, bulk meanwhile)."""

    FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)

    def __init__(self, src, dst):
        self.src, self.dst = src, dst
        self.pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.pipe[1], fcntl.F_SETPIPE_SZ, CHUNK_SIZE)
        except OSError:
            pass  # a pipe of the default size splices too, in smaller steps

    def take(self):
        return os.splice(self.src.fileno(), self.pipe[1], CHUNK_SIZE, flags=self.FLAGS)

    def give(self, done, size):
        return os.splice(self.pipe[0], self.dst.fileno(), size - done, flags=self.FLAGS)

    def close(self):
        os.close(self.pipe[0])
        os.close(self.pipe[1])


def carry_in_thread(pump, mover, src, dst, direction):
    """In a thread: move src to dst (duplicated sockets, closed here) until src has been quiet for
    OFF_LOOP_QUIET, it ends, or the pump fails; or, after OFF_LOOP_SLICE while other bulk directions
    wait for a thread, hand it back ("turn over"). Returns what OffLoop.carry returns."""
    lower_this_threads_priority()
    src.setblocking(False)
    dst.setblocking(False)
    readable, writable = select.poll(), select.poll()
    readable.register(src, select.POLLIN)
    writable.register(dst, select.POLLOUT)
    poll_ms = int(OFF_LOOP_POLL * 1000)
    heard = started = time.monotonic()
    try:
        moves = mover(src, dst)
    except OSError:  # no pipe to be had (out of descriptors): copy
        moves = ThreadCopy(src, dst)
    culprit = src
    try:
        while pump.failure is None:
            culprit = src
            if not readable.poll(poll_ms):
                if time.monotonic() - heard >= OFF_LOOP_QUIET:
                    return "quiet"
                continue
            with OFF_LOOP.turn:
                try:
                    size = moves.take()
                except BlockingIOError:
                    continue
            if not size:
                return "end"
            culprit, done = dst, 0
            while done < size and pump.failure is None:
                with OFF_LOOP.turn:
                    try:
                        part = moves.give(done, size)
                    except BlockingIOError:
                        part = 0
                done += part
                pump.sent[direction] += part
                if part:
                    pump.last_activity = time.monotonic()
                if done < size and pump.idle_timeout:
                    queued = unsent_bytes(dst)
                    if not writable.poll(poll_ms):
                        try:
                            pump._moved_while_waiting(dst, queued)
                        except socket.timeout:
                            return (dst, pump._idle())
                elif done < size:
                    writable.poll(poll_ms)
            heard = time.monotonic()
            if heard - started >= OFF_LOOP_SLICE and OFF_LOOP.others_wait():
                return "turn over"
        return "failed"
    except OSError as exc:
        return (culprit, exc)
    finally:
        moves.close()
        src.close()
        dst.close()


_NICED = threading.local()


def lower_this_threads_priority():
    """Linux: the calling thread (one of OffLoop's, which carry only bulk bytes) at OFF_LOOP_NICE, once.
    Only Linux gives each thread a priority of its own; elsewhere the whole process would be lowered."""
    if sys.platform.startswith("linux") and not getattr(_NICED, "done", False):
        _NICED.done = True
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), OFF_LOOP_NICE)
        except OSError:
            pass


OFF_LOOP = OffLoop()


class PipePool:
    """The kernel pipes that splicing directions borrow while they have bytes in flight.

    Pipes are kept for reuse up to `keep`; beyond that they are closed when given back. A pipe the
    kernel will not make (out of descriptors, or a user past fs.pipe-user-pages-soft is refused a
    larger size) never fails a connection: the direction copies instead, or splices through a pipe
    of the default size, and the log says so once.
    """

    def __init__(self, size=CHUNK_SIZE, keep=16):
        self.size, self.keep = size, keep
        self.idle = []
        self.warned = set()

    def take(self):
        """An empty pipe (read end, write end), or None when the kernel will not make one."""
        if self.idle:
            return self.idle.pop()
        try:
            pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            self._warn_once("copying instead of splicing while the kernel makes no pipes", exc)
            return None
        try:
            fcntl.fcntl(pipe[1], fcntl.F_SETPIPE_SZ, self.size)
        except OSError as exc:
            self._warn_once(f"splicing through pipes of the default size, not {self.size // 1024} KiB", exc)
        return pipe

    def give_back(self, pipe):
        """Return an empty pipe."""
        if len(self.idle) < self.keep:
            self.idle.append(pipe)
        else:
            self.discard(pipe)

    def discard(self, pipe):
        os.close(pipe[0])
        os.close(pipe[1])

    def _warn_once(self, what, exc):
        if exc.errno not in self.warned:
            self.warned.add(exc.errno)
            log.warning("%s: %s (logged once)", what, _reason(exc))


PIPES = PipePool()
GEVENT_INTERNALS = ("_read_event", "_write_event", "_wait")


def gevent_problem(socket_class=gevent.socket.socket):
    """None, or one line saying that this gevent lacks the internals wait_ready leans on."""
    missing = [name for name in GEVENT_INTERNALS if not hasattr(socket_class, name)]
    if missing:
        return (f"gevent {gevent.__version__} has no socket.{', socket.'.join(missing)}, which vtunnel's pump "
                f"waits with: install a gevent that setup.py allows (tested: 23.9.0 to 26.9)")
    return None


def wait_ready(sock, writing=False):
    """Park until a gevent socket is readable (or writable); close() in another greenlet wakes it.

    The one place vtunnel reaches into gevent's internals (GEVENT_INTERNALS,
    checked at start; `tox -e gevent-oldest,gevent-newest` run the suites on the
    range setup.py allows). No public call does this job: gevent.socket.wait_read
    and wait_write make a watcher of their own, which close() does not wake, and
    recv/send cannot wait without moving bytes, which splice must not.

    A socket the pump's other direction has already closed is EBADF, as recv
    would say: gevent's own complaint is no OSError and would escape the pump.
    """
    event = sock._write_event if writing else sock._read_event
    if event is None:
        raise OSError(errno.EBADF, "closed by the other direction")
    sock._wait(event)


# --------------------------------------------------------------------------
# 7. Servers, the service and its counters
# --------------------------------------------------------------------------

def accept_failed(server, exc):
    """An accept loop's one policy for a failed accept: the seconds to rest before accepting again,
    or None when the listener itself is broken or the error is a bug (the service then stops:
    Service.crash). Out of descriptors, clients wait in the listen backlog meanwhile."""
    if isinstance(exc, OSError) and exc.errno in RESOURCE_ERRORS:
        log.warning("%s: cannot accept: %s; accepting again in %gs", server.name, _reason(exc), ACCEPT_PAUSE)
        return ACCEPT_PAUSE
    if isinstance(exc, OSError) and exc.errno not in BROKEN_LISTENER_ERRORS:
        log.warning("%s: could not accept a client: %s", server.name, _reason(exc))  # it left first, say
        return 0
    server.crash(f"{server.name}: accepting")
    return None


class PolledServer(gevent.server.StreamServer):
    """The accept loop of a listener gevent polls: every kind but Hyper-V's (ThreadedServer).

    gevent's own loop, with accept_failed's policy instead of its retry-and-print; like
    every StreamServer it closes each connection once its handler returns.
    """
    # Service.crash, in a service: called when the accept loop meets what it cannot go on from
    crash = staticmethod(partial(log.exception, "unexpected error in %s"))

    def do_read(self):
        try:
            return super().do_read()
        except Exception as exc:
            pause = accept_failed(self, exc)
            if pause:
                self.stop_accepting()
                gevent.spawn_later(pause, self._resume_accepting)
            return None

    def _resume_accepting(self):
        if self.started:
            self.start_accepting()


class ThreadedServer:
    """PolledServer's life cycle (start, close, stop with a grace period) over a ThreadedListener,
    whose accept blocks in a thread; the same accept policy, and each connection closed once
    its handler returns."""

    def __init__(self, listener, handle, spawn):
        self.listener, self.handle, self.pool = listener, handle, spawn
        self.accepting = None
        self.name = ""
        self.crash = PolledServer.crash  # Service.crash, in a service

    @property
    def started(self):
        return self.accepting is not None and not self.accepting.dead

    def start(self):
        self.accepting = gevent.spawn(self._accept_forever)

    def _accept_forever(self):
        while True:
            self.pool.wait_available()  # a full pool: clients wait in the listen backlog
            try:
                conn, address = self.listener.accept()
            except Exception as exc:
                pause = accept_failed(self, exc)
                if pause is None:
                    return
                gevent.sleep(pause)
                continue
            self._wait_for_room()
            self.pool.spawn(self._handle_and_close, conn, address)

    def _wait_for_room(self):
        """Windows has no descriptor limit to stop accepts before the process holds more connections
        than it can serve: at STREAM_CEILING open streams, the client just accepted waits unserved and
        the next ones in the listen backlog, until some connections close (as on Linux when out of
        descriptors). Checked after the accept, when the count includes every connection so far."""
        if vtunnel_npipe.COMPLETIONS.open_streams < STREAM_CEILING:
            return
        log.warning("%s: this process holds %d connection ends, its ceiling: new clients wait until some close",
                    self.name, vtunnel_npipe.COMPLETIONS.open_streams)
        while vtunnel_npipe.COMPLETIONS.open_streams >= STREAM_CEILING:
            gevent.sleep(ACCEPT_PAUSE)
        log.info("%s: accepting again", self.name)

    def _handle_and_close(self, conn, address):
        try:
            self.handle(conn, address)
        finally:
            conn.close()

    def close(self):
        if self.accepting is not None:
            self.accepting.kill(block=False)
        self.listener.close()

    def stop(self, timeout=None):
        self.close()
        self.pool.join(timeout=timeout)
        self.pool.kill(block=True, timeout=1)


class Stats:
    """Counters for one tunnel at one end: logged on an interval, on SIGUSR1 and at shutdown."""

    def __init__(self, tunnel, end, far_name):
        self.tunnel, self.end, self.far_name = tunnel, end, far_name
        self.label = f"{tunnel} ({end})"
        self.total = 0
        self.pumps = set()  # of the open connections: their bytes count as they move
        self.sent_by_closed = [0, 0]  # bytes towards the far end, bytes back
        self.failures = collections.Counter()
        self.refused = collections.Counter()  # legs refused before anything was dialled, by reason
        self.last_error = None  # the latest problem: a failed connection, a handshake, a listener

    @property
    def open(self):
        return len(self.pumps)

    @property
    def sent(self):
        """Bytes towards the far end and back, the open connections' included."""
        return [self.sent_by_closed[way] + sum(pump.sent[way] for pump in self.pumps) for way in (0, 1)]

    def opened(self, pump):
        self.pumps.add(pump)

    def ended(self, pump, near_name):
        self.pumps.discard(pump)
        self.sent_by_closed[0] += pump.sent[0]
        self.sent_by_closed[1] += pump.sent[1]
        if pump.failure:
            exc = pump.failure[1]
            self.failed(f"{failed_end(pump, near_name, self.far_name)} {_reason(exc)}")

    def failed(self, cause, detail=None):
        """Count a failed connection under `cause`; the last error says `detail` too, if given."""
        self.failures[cause] += 1
        self.last_error = f"{cause}: {detail}" if detail else cause

    def line(self):
        failures = ", ".join(f"{cause} {count}" for cause, count in sorted(self.failures.items())) or "none"
        sent = self.sent
        refused = ", ".join(f"{reason} {count}" for reason, count in sorted(self.refused.items())) or "none"
        return (f"stats {self.label}: {self.open} open, {self.total} total, {sent[0]} bytes to "
                f"{self.far_name}, {sent[1]} bytes back, failures: {failures}, legs refused: {refused}")


class ConnectionIds:
    """Numbers connections for the log. In `local` both ends are in one process, and the host's
    end of a tunnel leg takes the number of the client the peer dialled it for: one client, one
    number, at both ends. (Between two processes nothing on the wire could carry it.)"""

    def __init__(self):
        self.numbers = itertools.count(1)
        self.legs = None  # in `local`: a leg's address at the peer -> the client's number, once known

    def share_between_ends(self):
        self.legs = {}

    def new(self):
        return next(self.numbers)

    def dialled(self, leg, number):
        """The peer dialled `leg` for client `number`."""
        if self.legs is not None:
            self.legs.setdefault(leg.getsockname(), gevent.event.AsyncResult()).set(number)

    def accepted(self, address):
        """The number for a leg the host accepted from `address`: its client's, where known."""
        if self.legs is None:
            return self.new()
        slot = self.legs.setdefault(address, gevent.event.AsyncResult())
        try:  # the peer's greenlet may not have run since its connect returned
            return slot.get(timeout=1)
        except gevent.Timeout:
            return self.new()
        finally:
            self.legs.pop(address, None)


class Notifier:
    """systemd's sd_notify protocol, spoken only when systemd sets NOTIFY_SOCKET (a socket path, or
    @name for an abstract one): one datagram per message, so no library is needed. READY=1 once every
    listener is bound, STATUS= as tunnels come and go, STOPPING=1 on a stop signal, and WATCHDOG=1
    every half of WATCHDOG_USEC from a greenlet: a stalled event loop stops the pings, and systemd
    restarts the process."""

    def __init__(self, environ=os.environ):
        address = environ.get("NOTIFY_SOCKET") if hasattr(socket, "AF_UNIX") else None
        self.address = "\0" + address[1:] if address and address.startswith("@") else address
        usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
        mine = not pid.isdigit() or int(pid) == os.getpid()
        self.watchdog = int(usec) / 1e6 if self.address and usec.isdigit() and int(usec) and mine else None
        self.sock, self.warned = None, False

    def send(self, *messages):
        if not self.address:
            return
        try:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # sendto never blocks it long
            self.sock.sendto("\n".join(messages).encode(), self.address)
        except OSError as exc:
            if not self.warned:
                log.warning("cannot tell systemd (NOTIFY_SOCKET=%s): %s", self.address.replace("\0", "@"),
                            _reason(exc))
                self.warned = True

    def ping_forever(self):
        while True:
            self.send("WATCHDOG=1")
            gevent.sleep(self.watchdog / 2)


class ActivatedSockets:
    """Listening sockets systemd passed (socket activation, sd_listen_fds): a `.socket` unit owns them,
    starts vtunnel on the first client, and queues clients while vtunnel restarts instead of refusing
    them. Read once at start when LISTEN_PID is this process: descriptors 3 to 3 + LISTEN_FDS - 1, named
    by LISTEN_FDNAMES (FileDescriptorName=). The variables are unset so that children do not inherit them.

    take() hands a tunnel's clients' listener (the peer's peer-address/peer-socket, the host's
    host-listen-address) or the metrics endpoint a duplicate of the socket passed under its name, else
    of the one bound to its address; a retired listener closes only its duplicate, so a changed tunnel
    takes the socket again. A tunnel a reload removed closes the socket it took (systemd keeps its own).
    """

    def __init__(self, environ=os.environ):
        self.sockets = []  # [name, socket, taken by] per passed socket
        pid, count, names = (environ.pop(name, "") for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"))
        if not (pid.isdigit() and int(pid) == os.getpid() and count.isdigit()):
            return
        names = names.split(":") if names else []
        for index in range(int(count)):
            fd = 3 + index  # SD_LISTEN_FDS_START
            os.set_inheritable(fd, False)  # systemd passes them inheritable: not for wsl.exe and the like
            name = names[index] if index < len(names) else "unknown"
            try:
                sock = socket.socket(fileno=fd)
            except OSError:
                log.warning("systemd passed descriptor %d (%s), which is not a socket: ignored", fd, name)
                continue
            if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                log.warning("systemd passed %s (%s), a socket that does not listen (vtunnel needs Accept=no): "
                            "ignored", listener_name(sock), name)
                sock.close()
                continue
            self.sockets.append([name, sock, None])
            log.info("systemd passed a socket: %s (%s)", listener_name(sock), name)

    def take(self, endpoint, name):
        """A listening gevent socket for `endpoint` of `name` (a tunnel, or "metrics"), or None."""
        entry = (next((e for e in self.sockets if e[0] == name), None)
                 or next((e for e in self.sockets if self._bound_to(e[1], endpoint)), None))
        if entry is None:
            return None
        entry[2] = name
        return gevent.socket.socket(fileno=os.dup(entry[1].fileno()))

    @staticmethod
    def _bound_to(sock, endpoint):
        try:
            bound = sock.getsockname()
        except OSError:
            return False
        if isinstance(endpoint, UnixEndpoint):
            return sock.family == socket.AF_UNIX and bound == endpoint.path
        if isinstance(endpoint, TcpEndpoint) and sock.family in (socket.AF_INET, socket.AF_INET6):
            return bound[1] == endpoint.port and _same_ip(bound[0], endpoint.host)
        return False

    def warn_unmatched(self, listeners):
        """One warning per passed socket that no listener of `listeners` ({name: endpoint}) would take."""
        for name, sock, _ in self.sockets:
            if name not in listeners and not any(self._bound_to(sock, e) for e in listeners.values()):
                log.warning("systemd passed a socket that matches no tunnel: %s (%s); it is left unused (name "
                            "it after a tunnel with FileDescriptorName=, or bind it to the tunnel's address)",
                            listener_name(sock), name)

    def release_all_but(self, names):
        """After a reload: close the sockets taken by tunnels no longer in the config."""
        for entry in list(self.sockets):
            if entry[2] is not None and entry[2] not in names and entry[2] != "metrics":
                log.info("%s: removed by the reload: closing the socket systemd passed (%s)", entry[2],
                         listener_name(entry[1]))
                entry[1].close()
                self.sockets.remove(entry)


def listener_name(sock):
    """How the log names a listening socket: IP:PORT, or unix:///PATH."""
    bound = sock.getsockname()
    return f"unix://{bound}" if sock.family == getattr(socket, "AF_UNIX", None) else _address(bound)


def _same_ip(a, b):
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b)
    except ValueError:
        return a == b


class TunnelRun:
    """One tunnel at one end, as this process serves it: the listeners and the socket files they
    made, the tasks that keep it (the host's handshakes), its counters and its state in words.

    A reload starts runs and retires them whole: a retired run accepts no more, and its open
    connections run on (a changed tunnel) or have --grace to finish (a removed one).
    """

    def __init__(self, tunnel, end, stats, started_by_reload=False):
        self.tunnel, self.end, self.stats = tunnel, end, stats
        self.started_by_reload = started_by_reload
        self.servers, self.cleanups = [], []
        self.tasks = gevent.pool.Group()
        self.state, self.up, self.failed = "starting", False, False
        self.reach = None  # the transport that reaches the peer now (a reverse tunnel's host dials it)
        self.activated = False  # its clients' listener came from systemd (ActivatedSockets)
        self.handshake_answered = None  # at the peer: when the host last handshook (time.monotonic())
        self.mirrored = {}  # a mirror's VM ports now: {port: the address the service listens on}
        self.failed_ports = {}  # at the host: a mirror's VM ports that could not listen, and why
        self.mirror_warnings = set()  # at the host: what it has warned about once (ports not ours, too many)
        self.mirror_changed = gevent.event.Event()  # at the peer: set (and replaced) when `mirrored` changes

    def mirror_status(self):
        """A mirror's ports for /status: {VM port: {"vm": the address the service listens on, "host": where
        the host listens for it}} (the host lists those it listens on; the peer, those it reports)."""
        tunnel = self.tunnel
        if not tunnel.mirror:
            return {}
        host = tunnel.host_listen.host
        mirrored = {str(port): {"vm": address, "host": format_host_port(host, port + tunnel.host_port_offset)}
                    for port, address in sorted(self.mirrored.items())}
        return {"mirrored": mirrored, "cannot_listen": {str(port): why for port, why in self.failed_ports.items()}}

    def set_state(self, state, up=None, error=None):
        self.state = state
        self.up = self.up if up is None else up
        if error:
            self.stats.last_error = error

    def stop_accepting(self):
        """Close the listeners and remove their socket files; the open connections run on."""
        self.tasks.kill(block=False)
        close_listeners(self.servers, self.cleanups)
        self.up = False

    @property
    def open_connections(self):
        return sum(len(server.pool) for server in self.servers)

    def finish(self, grace=None):
        """Wait for the open connections (at most `grace` seconds), then abort what is left."""
        finish_connections(self.servers, grace, TunnelRemoved)


def close_listeners(servers, cleanups):
    """Stop the accept loops and run the cleanups (remove socket files); open connections run on."""
    for server in servers:
        server.close()
    for cleanup in cleanups:
        cleanup()
    cleanups.clear()


def finish_connections(servers, grace, exception=gevent.GreenletExit, hurry=None):
    """Wait for the servers' open connections, at most `grace` seconds (or until `hurry` is set),
    then kill what is left with `exception`: each pump aborts its connection and logs it."""
    finishing = gevent.spawn(lambda: [server.pool.join() for server in servers])
    gevent.wait([finishing] + ([hurry] if hurry else []), timeout=grace, count=1)
    finishing.kill()
    for server in servers:
        server.pool.kill(exception, block=True, timeout=1)


class Service:
    """Holds the tunnels of one process (a TunnelRun per tunnel and end), reloads them on SIGHUP,
    and stops them on a signal or a fatal error.

    A role (Peer, Host) names its `end` and each tunnel's `far` end, says which of a tunnel's keys it uses
    (`part`), and starts a run (`start_tunnel`) with start_server and spawn_for.
    """

    def __init__(self, grace=5.0, stats_interval=None, config_path=None, load_tunnels=None):
        self.grace, self.stats_interval = grace, stats_interval
        self.config_path, self.load_tunnels = config_path, load_tunnels  # load_tunnels(path) -> [Tunnel]
        self.notifier = Notifier()
        self.status = lambda: "starting"  # what STATUS= says: set by the roles
        self.roles = []
        self.runs = {}  # (tunnel name, end) -> TunnelRun, in config order: what the config asks for now
        self.retired = []  # runs a reload retired whose connections are still open
        self.servers, self.cleanups = [], []  # the service's own: the metrics endpoint
        self.greenlets = gevent.pool.Group()
        self.reloading = gevent.lock.Semaphore()
        self.reloads = collections.Counter({"ok": 0, "invalid": 0, "failed": 0})
        self.stopping = gevent.event.Event()
        self.hurry = gevent.event.Event()  # a second stop signal: no more grace
        self.fatal = None
        self.connection_ids = ConnectionIds()
        self.activated = ActivatedSockets({})  # none, unless run() reads them from the environment

    @property
    def stats(self):
        return [run.stats for run in self.runs.values()]

    def start(self, roles, tunnels):
        """Start every tunnel at every end of this process; a StartupError stops the lot."""
        self.roles = roles
        for tunnel in tunnels:
            for role in roles:
                self._start_run(role, tunnel)

    def _start_run(self, role, tunnel, stats=None, by_reload=False):
        stats = stats or Stats(tunnel.name, role.end, role.far(tunnel))
        run = self.runs[(tunnel.name, role.end)] = TunnelRun(tunnel, role.end, stats, by_reload)
        role.start_tunnel(run)
        return run

    def start_server(self, run, endpoint, handle, name, max_connections=None, clients=False):
        """Listen on `endpoint` for `run` and serve each connection with handle(conn, address).
        clients: where the tunnel's clients connect, which systemd may have passed (ActivatedSockets)."""
        listener = self.activated.take(endpoint, run.tunnel.name) if clients else None
        where = str(endpoint)
        if listener is not None:
            run.activated = True
            where = f"{listener_name(listener)} (passed by systemd)"
        else:
            try:
                listener = endpoint.listen()
            except OSError as exc:
                raise StartupError(f"tunnel {run.tunnel.name!r}: cannot listen on {endpoint}: {_reason(exc)}") from None
            run.cleanups.append(endpoint.close_listener)
        # A full pool stops the accept loop: further clients wait in the listen backlog.
        threaded = isinstance(listener, (ThreadedListener, vtunnel_npipe.PipeListener))  # accept() blocks
        server_class = ThreadedServer if threaded else PolledServer
        server = server_class(listener, handle, spawn=gevent.pool.Pool(max_connections))
        server.name, server.crash, server.where = name, self.crash, where
        server.start()
        run.servers.append(server)
        return server

    def spawn(self, function, *args):
        self.greenlets.spawn(self._guard, None, function, *args)

    def listener_inodes(self):
        """The inodes of every socket this process listens on (a mirror never mirrors them)."""
        inodes = set()
        for server in [*self.servers, *(srv for run in self.runs.values() for srv in run.servers)]:
            try:
                inodes.add(str(os.fstat(server.socket.fileno()).st_ino))
            except (OSError, AttributeError, ValueError):
                pass
        return inodes

    def spawn_for(self, run, function, *args):
        """A task of `run`'s (killed when the run is retired)."""
        run.tasks.spawn(self._guard, run, function, *args)

    def _guard(self, run, function, *args):
        try:
            function(*args)
        except StartupError as exc:
            if run is not None and run.started_by_reload:  # the tunnels that were serving serve on
                self._run_failed(run, str(exc))
            else:
                self.fail(str(exc))
        except Exception:
            self.crash(getattr(function, "__name__", "a task"))

    def fail(self, message):
        if self.fatal is None:
            self.fatal = message
        self.stopping.set()

    def crash(self, where):
        """An unexpected error (a bug) in a tunnel's own loop: say so with the traceback, and stop.

        A process that lived on without that tunnel would look healthy to its service
        manager; exiting non-zero lets the manager start it afresh.
        """
        log.exception("unexpected error in %s; stopping", where)
        self.fail(f"stopped after an unexpected error in {where} (its traceback is above)")

    def ready(self):
        """Every listener is bound (the host's tunnels listen or wait for their peer)."""
        self.notifier.send("READY=1", f"STATUS={self.status()}")
        log.debug("ready: %s", self.status())

    def status_changed(self):
        self.notifier.send(f"STATUS={self.status()}")

    # -- reload: SIGHUP, or POST /reload on the metrics endpoint (Windows has no SIGHUP)

    def reload(self):
        """Re-read the config: start the tunnels that are new, retire the ones that are gone or
        changed, keep the rest untouched. A config with any problem changes nothing. Returns
        what happened, as /reload answers it."""
        if self.stopping.is_set():
            return {"result": "stopping"}
        with self.reloading:
            self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")
            try:
                tunnels = self.load_tunnels(self.config_path)
            except (UsageError, StartupError) as exc:
                problems = getattr(exc, "errors", [str(exc)])
                for problem in problems:
                    log.error("reload: %s", problem)
                log.error("reload: nothing changed: the %d tunnel(s) serving go on as before", len(self._names()))
                outcome = {"result": "invalid", "problems": problems}
            else:
                outcome = self._apply(tunnels)
            self.reloads[outcome["result"]] += 1
            self.ready()
            return outcome

    def _names(self):
        return list(dict.fromkeys(name for name, _ in self.runs))

    def _apply(self, tunnels):
        new = {tunnel.name: tunnel for tunnel in tunnels}
        plan = {tunnel.name: self._compare(tunnel) for tunnel in tunnels}
        removed = [name for name in self._names() if name not in new]
        # Retire first: a new or changed tunnel may take the address a retired one listened on.
        for (name, end), run in list(self.runs.items()):
            if name not in new:
                log.info("reload: %s (%s) removed: %d open connection(s) have %gs to finish", name, end,
                         run.open_connections, self.grace)
                self._retire(run, self.grace)
            elif not self._keeps(run, new[name]):
                self._retire(run)  # its open connections run on
        old, self.runs, started = self.runs, {}, []
        for tunnel in tunnels:
            for role in self.roles:
                run = old.get((tunnel.name, role.end))
                if self._keeps(run, tunnel):
                    self.runs[(tunnel.name, role.end)] = run
                    continue
                # The counters go on, unless the tunnel changed direction: their names would be wrong.
                stats = run.stats if run and run.tunnel.reverse == tunnel.reverse else None
                try:
                    started.append(self._start_run(role, tunnel, stats, by_reload=True))
                except StartupError as exc:
                    self._run_failed(self.runs[(tunnel.name, role.end)], str(exc))
                    started.append(self.runs[(tunnel.name, role.end)])
        self._await_start(started)
        self.activated.release_all_but(new)
        self.status_changed()
        failed = list(dict.fromkeys(run.tunnel.name for run in started if run.failed))
        pending = list(dict.fromkeys(run.tunnel.name for run in started if not run.failed and not run.up))
        return self._summarize(plan, removed, failed, pending)

    @staticmethod
    def _await_start(runs):
        """Wait (at most RELOAD_WAIT) until each run listens or has failed: a host listens only after
        its handshake, in the background, and /reload must not answer ok before it knows."""
        deadline = time.monotonic() + RELOAD_WAIT
        while any(not run.up and not run.failed for run in runs) and time.monotonic() < deadline:
            gevent.sleep(0.02)

    def _keeps(self, run, tunnel):
        """Whether `run` serves `tunnel` as it is now: every key its end uses is unchanged."""
        if run is None or run.failed:
            return False
        part = next(role.part for role in self.roles if role.end == run.end)
        return part(run.tunnel) == part(tunnel)

    def _compare(self, tunnel):
        """'added', 'changed' (an end here uses a key that changed) or 'kept'."""
        runs = [self.runs.get((tunnel.name, role.end)) for role in self.roles]
        if all(run is None for run in runs):
            return "added"
        return "kept" if all(self._keeps(run, tunnel) for run in runs) else "changed"

    @staticmethod
    def _summarize(plan, removed, failed, pending):
        """One log line for the whole reload, and /reload's answer: "failed" when a tunnel could not
        start, "pending" when one still waits for the other end (after RELOAD_WAIT), else "ok"."""
        named = {kind: [name for name, what in plan.items() if what == kind] for kind in ("added", "changed")}
        named["removed"] = removed
        kept = sum(1 for what in plan.values() if what == "kept")
        counts = ", ".join(f"{len(names)} {kind}" + (f" ({', '.join(names)})" if names else "")
                           for kind, names in named.items())
        log.info("reload: %s, %d kept%s%s", counts, kept,
                 f"; {len(failed)} could not start ({', '.join(failed)})" if failed else "",
                 f"; {len(pending)} waiting for the other end ({', '.join(pending)})" if pending else "")
        result = "failed" if failed else "pending" if pending else "ok"
        return {"result": result, **named, "kept": kept, "failed": failed, "pending": pending}

    def _retire(self, run, grace=None):
        run.stop_accepting()
        if run.failed:
            return
        self.retired.append(run)
        self.greenlets.spawn(self._finish_retired, run, grace)

    def _finish_retired(self, run, grace):
        run.finish(grace)
        self.retired.remove(run)

    def _run_failed(self, run, message):
        log.error("reload: %s; the other tunnels serve on", message)
        run.stop_accepting()
        run.failed = True
        run.set_state(f"not serving: {message}", up=False, error=message)
        self.status_changed()

    # -- the metrics endpoint

    def serve_metrics(self, endpoint):
        """/metrics (the Prometheus text format, by prometheus_client), /status (JSON) and POST
        /reload on gevent's pywsgi, from the same counters the log shows, live."""
        try:
            import prometheus_client  # noqa: F401 (vtunnel_metrics')
        except ImportError:
            raise StartupError("--metrics needs the prometheus_client package: pip install prometheus_client") from None
        if not endpoint.is_loopback:
            log.warning("metrics on %s, not a loopback address: anyone who can reach it reads them", endpoint)
        listener = self.activated.take(endpoint, "metrics")
        if listener is None:
            try:
                listener = endpoint.listen()
            except OSError as exc:
                raise StartupError(f"--metrics: cannot listen on {endpoint}: {_reason(exc)}") from None
            self.cleanups.append(endpoint.close_listener)
        server = vtunnel_metrics.MetricsServer(listener, vtunnel_metrics.MetricsApp(self),
                                               spawn=gevent.pool.Pool(METRICS_SLOTS), log=None,
                               error_log=log)
        server.start()
        self.servers.append(server)
        log.info("metrics: serving /metrics and /status on %s", endpoint)

    # -- running and stopping

    def run(self):
        """Serve until asked to stop; return the exit code."""
        if self.notifier.watchdog:
            self.spawn(self.notifier.ping_forever)
        if self.stats_interval:
            self.spawn(self._log_stats_every, self.stats_interval)
        self.stopping.wait()
        self.greenlets.kill()
        self._drain()
        self.log_stats(logging.WARNING)  # the totals, even at --log-level warning
        if self.fatal:
            log.error("%s", self.fatal)
            return EXIT_FAILURE
        log.info("stopped")
        return EXIT_OK

    def handle_signals(self):
        """Take over SIGINT, SIGTERM (stop), SIGHUP (reload) and SIGUSR1 (log the counters):
        before any listener opens."""
        handlers = {signal.SIGINT: self._on_stop_signal, signal.SIGTERM: self._on_stop_signal}
        if hasattr(signal, "SIGUSR1"):
            handlers[signal.SIGUSR1] = lambda signum: self.log_stats(logging.WARNING)  # asked for: shown
        if hasattr(signal, "SIGHUP"):
            handlers[signal.SIGHUP] = self._on_reload_signal
        for signum, handler in handlers.items():
            try:
                gevent.signal_handler(signum, handler, signum)
            except (AttributeError, ValueError):  # gevent on Windows has no signal watchers
                signal.signal(signum, lambda number, _frame, h=handler: gevent.spawn(h, number))

    def _on_reload_signal(self, signum):
        log.info("SIGHUP: reloading %s", self.config_path)
        self.reload()

    def _on_stop_signal(self, signum):
        name = signal.Signals(signum).name
        if not self.stopping.is_set():
            self.notifier.send("STOPPING=1")
            self.stop_accepting()  # before the log line says so
            log.info("%s: no new connections; open ones have %gs to finish (send it again to end them now)",
                     name, self.grace)
            self.stopping.set()
        elif not self.hurry.is_set():
            log.info("%s again: ending open connections now", name)
            self.hurry.set()

    def log_stats(self, level=logging.INFO):
        for stats in self.stats:
            log.log(level, "%s", stats.line())
        log.log(level, "process: %d greenlets, %s file descriptors (%d in spare splice pipes)", count_greenlets(),
                count_descriptors(), 2 * len(PIPES.idle))

    def _log_stats_every(self, interval):
        while True:
            gevent.sleep(interval)
            self.log_stats()

    def _every_run(self):
        return list(self.runs.values()) + self.retired

    def _drain(self):
        """Stop accepting; give open connections the grace period, then abort what is left."""
        self.stop_accepting()  # already, after a stop signal; not after a fatal error
        servers = [server for run in self._every_run() for server in run.servers]
        finish_connections(servers, self.grace, hurry=self.hurry)
        # The metrics endpoint's connections get no grace: a scraper's keep-alive connection is never
        # done, and would hold every stop for the whole grace period.
        finish_connections(self.servers, 0)

    def close(self):
        """Close every listener and remove the socket files this process made (a start that failed)."""
        self.stop_accepting()

    def stop_accepting(self):
        for run in self._every_run():
            run.stop_accepting()
        close_listeners(self.servers, self.cleanups)


def monotonic_usec():
    """CLOCK_MONOTONIC in microseconds, as sd_notify's MONOTONIC_USEC= wants it."""
    clock = getattr(time, "CLOCK_MONOTONIC", None)
    return (time.clock_gettime_ns(clock) if clock is not None else time.monotonic_ns()) // 1000


def raise_descriptor_limit():
    """Lift the soft limit on open files to the hard one, as every Go program does at start.

    Login shells and systemd user units set 1024, and each connection costs two
    descriptors at each end. Returns the limit now in force (None on Windows).
    """
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # an unlimited hard limit can be more than the kernel's nr_open: keep the soft one
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def count_greenlets():
    return sum(1 for obj in gc.get_objects() if isinstance(obj, greenlet.greenlet) and not obj.dead)


def count_descriptors():
    try:
        return str(len(os.listdir("/proc/self/fd")) - 1)  # less the one listdir holds
    except OSError:
        return "unknown"


# --------------------------------------------------------------------------
# 8. Peer and host: the two ends of every tunnel
# --------------------------------------------------------------------------

def failed_end(pump, near_name, far_name):
    """Which end of a failed pump failed, by name: the near end is the pump's left."""
    return {"left": near_name, "right": far_name}.get(pump.failure[0], pump.failure[0])


def relay(tunnel, stats, conn_id, near, dial_far, near_name, where, leg_is_near):
    """Dial the far end for `near`, then pump the two; count and log what happened.

    One of the two is the tunnel leg, whose far end is the other vtunnel. A bug
    met here fails the connection, loudly: returning would close `near` cleanly,
    an end of stream that would pass for a complete transfer.
    """
    far = None
    try:
        far = _dial_for(tunnel, stats, conn_id, near, dial_far, near_name, where)
        if far is not None:
            _pump_and_log(tunnel, stats, conn_id, near, far, near_name, where, leg_is_near)
    except Exception:
        log.exception("%s #%d: unexpected error: ending this connection in failure", tunnel.name, conn_id)
        for sock in (near, far):
            if sock is not None:
                abort(sock)


def _dial_for(tunnel, stats, conn_id, near, dial_far, near_name, where):
    """The far end's connected stream, or None (then `near` is aborted and the failure counted)."""
    stats.total += 1
    dialling = time.monotonic()
    try:
        far = dial_far(tunnel.connect_timeout)
    except (OSError, gevent.Timeout) as exc:
        stats.failed(f"{stats.far_name} unreachable", _reason(exc))
        log.warning("%s #%d %s: %s unreachable: %s; closing the %s", tunnel.name, conn_id, where,
                    stats.far_name, _reason(exc), near_name)
        abort(near)
        return None
    log.debug("%s #%d: dialled %s in %.3fs", tunnel.name, conn_id, stats.far_name, time.monotonic() - dialling)
    return far


def _pump_and_log(tunnel, stats, conn_id, near, far, near_name, where, leg_is_near):
    log.info("%s #%d opened %s", tunnel.name, conn_id, where)
    if log.isEnabledFor(logging.DEBUG):
        described = f"{near_name} {describe_socket(near)}, {stats.far_name} {describe_socket(far)}"
    near, far = overlapped_on_windows(near), overlapped_on_windows(far)
    pump = Pump(near, far, tunnel.idle_timeout, leg=near if leg_is_near else far)
    stats.opened(pump)
    if log.isEnabledFor(logging.DEBUG):
        log.debug("%s #%d: %s; bytes move by %s", tunnel.name, conn_id, described,
                  "splice" if pump.splices else "copy through Python")
    try:
        pump.run()
    finally:  # killed at the end of the grace period too: the cut connection is counted and logged
        stats.ended(pump, near_name)
        result = "closed"
        if pump.failure:
            exc = pump.failure[1]
            hint = exchange_hint(tunnel, pump, leg_is_near)
            result = f"failed ({failed_end(pump, near_name, stats.far_name)}: {_reason(exc)}{hint})"
        level = logging.WARNING if pump.failure else logging.INFO  # a failure shows at --log-level warning
        log.log(level, "%s #%d %s after %.3fs: %d bytes to %s, %d bytes back", tunnel.name, conn_id, result,
                 pump.elapsed, pump.sent[0], stats.far_name, pump.sent[1])


class Role:
    """What the two ends share: the two ways a connection is carried. One end accepts a client
    and dials a leg to the other vtunnel; the other accepts the leg and dials the upstream.
    Forward, the peer has the clients and the host the upstream; reverse, the other way round."""
    end = other_end = None

    def __init__(self, transport, service):
        self.transport, self.service = transport, service
        self.refusals = vtunnel_trust.RefusalLog()

    def far(self, tunnel):
        """What this end dials for the tunnel, by name: the other vtunnel, or the upstream."""
        return "upstream" if self.dials_upstream(tunnel) else self.other_end

    def dials_upstream(self, tunnel):
        raise NotImplementedError

    def carry_client(self, tunnel, legs, stats, client, address, leg_header=b""):
        """A client accepted where the tunnel's clients connect (tuned by its listener, if TCP):
        dial a leg to `legs()` and pump. leg_header: what the leg opens with after the leg checks (a
        mirror's: which VM port)."""
        source = format_host_port(*address[:2]) if isinstance(address, tuple) and address else str(tunnel.clients_at)
        number = self.service.connection_ids.new()

        def dial_leg(timeout):
            leg = legs().connect(timeout)
            self.service.connection_ids.dialled(leg, number)
            if tunnel.leg_secret:
                try:
                    self.prove(tunnel, leg, vtunnel_trust.prove_as_dialler)
                except vtunnel_trust.LegRefused as exc:
                    stats.refused[exc.reason] += 1
                    abort(leg)
                    raise ConnectionRefusedError(errno.ECONNREFUSED, f"leg refused: {exc}") from None
            if leg_header:
                leg.sendall(leg_header)
            if tunnel.proxy_protocol:  # for the other end to tell the upstream
                leg.sendall(vtunnel_trust.proxy_header(client_addresses(client)))
            return leg
        relay(tunnel, stats, number, client, dial_leg, "client", f"from {source}", leg_is_near=False)

    def admit(self, tunnel, stats, leg, address, then=None):
        """The checks every accepted leg passes: who dialled it (the transport), then the leg exchange
        if the tunnel has a leg secret; then `then()`, which may refuse too. Its result, or None when
        the leg was refused (and closed, counted and logged)."""
        try:
            if problem := self.transport.refuses(address):
                raise vtunnel_trust.LegRefused("foreign cid", f"{problem}: the {self.other_end} is not there")
            if tunnel.leg_secret:
                self.prove(tunnel, leg, vtunnel_trust.prove_as_acceptor)
            return then() if then else True
        except vtunnel_trust.LegRefused as exc:
            self.refuse(tunnel, stats, leg, address, exc)
            return None

    def carry_leg(self, tunnel, stats, leg, address):
        """A leg accepted from the other vtunnel: check who dialled it (admit), dial the upstream and pump."""
        header = self.admit(tunnel, stats, leg, address, lambda: tunnel.proxy_protocol and self.client_header(
            tunnel, leg, address) or b"")
        if header is None:
            return

        def dial_upstream(timeout):
            upstream = tunnel.upstream.connect(timeout)
            if header:
                upstream.sendall(header)
            if not tunnel.leg_secret and opens_with_the_leg_exchange(leg):
                upstream.close()
                stats.refused["no secret here"] += 1
                raise ConnectionRefusedError(errno.ECONNREFUSED, "the leg opened with the leg exchange, but this "
                                             "end has no leg-secret-file: set it, to the same secret, at both ends")
            return upstream
        relay(tunnel, stats, self.service.connection_ids.accepted(address), leg, dial_upstream,
              self.other_end, f"to {tunnel.upstream}", leg_is_near=True)

    def client_header(self, tunnel, leg, address):
        """The PROXY v2 header for the upstream: the client's addresses, read from the leg (within the
        connect-timeout), with the tunnel's name and, at the host, the VM's identity as TLVs."""
        try:
            with gevent.Timeout(tunnel.connect_timeout):
                command, family, block = vtunnel_trust.read_proxy_header(leg)
        except gevent.Timeout:
            raise vtunnel_trust.LegRefused("no client address", "the client's address did not come on the leg "
                                           f"within {tunnel.connect_timeout:g}s (connect-timeout)") from None
        except OSError as exc:
            raise vtunnel_trust.LegRefused("no client address", f"reading the client's address on the leg: "
                                           f"{_reason(exc)}") from None
        tlvs = [(vtunnel_trust.TLV_TUNNEL, tunnel.name.encode())]
        if self.end == "host" and isinstance(self.transport, (VsockTransport, HyperVTransport)):
            kind = "cid" if isinstance(self.transport, VsockTransport) else "hyperv"
            tlvs.append((vtunnel_trust.TLV_VM, f"{kind}:{address[0]}".encode()))
        return vtunnel_trust.proxy_header_from(command, family, block, tlvs)

    def prove(self, tunnel, leg, half):
        """One half of the leg exchange (vtunnel_trust), within the tunnel's connect-timeout."""
        try:
            with gevent.Timeout(tunnel.connect_timeout):
                half(leg, tunnel.leg_secret.key(), tunnel.leg_port)
        except gevent.Timeout:
            raise vtunnel_trust.LegRefused("timed out", f"the leg exchange took over {tunnel.connect_timeout:g}s "
                                           f"(connect-timeout): {vtunnel_trust.HINT}") from None
        except vtunnel_trust.LegSecretError as exc:  # the file changed since the start
            raise vtunnel_trust.LegRefused("secret unreadable", str(exc)) from None
        except OSError as exc:
            raise vtunnel_trust.LegRefused("no exchange", f"the leg failed during the leg exchange "
                                           f"({_reason(exc)}): {vtunnel_trust.HINT}") from None

    def refuse(self, tunnel, stats, leg, address, exc):
        """Close a refused leg, count it, and log it (one line per source and reason a minute)."""
        abort(leg)
        stats.refused[exc.reason] += 1
        source = address[0] if isinstance(address, tuple) and address else "the leg's listener"
        refused = self.refusals.count((tunnel.name, source), exc.reason)
        if refused:
            since = f" ({refused} refused in the last minute)" if refused > 1 else ""
            log.warning("%s: refused a leg from %s: %s%s", tunnel.name, source, exc, since)


class Peer(Role):
    """The VM end: answers handshakes; forward, a listener per tunnel, each client carried to the
    host over vsock; reverse, a vsock listener, each leg carried to the upstream in the VM."""
    end, other_end = "peer", "host"

    def __init__(self, transport, service):
        super().__init__(transport, service)
        service.status = lambda: f"{self.listening()} tunnel(s) listening"

    def dials_upstream(self, tunnel):
        return tunnel.reverse

    @staticmethod
    def part(tunnel):
        """The keys the peer uses: a reload that changes none of them leaves its tunnel alone."""
        return (tunnel.reverse, tunnel.handshake_port, tunnel.leg_port, tunnel.upstream if tunnel.reverse else
                tunnel.peer, tunnel.max_connections, tunnel.connect_timeout, tunnel.idle_timeout, tunnel.leg_secret,
                tunnel.proxy_protocol, tunnel.mirror_ports, tunnel.exclude_ports)

    def listening(self):
        return sum(run.up for run in self.service.runs.values() if run.end == self.end)

    def start_tunnel(self, run):
        tunnel = run.tunnel
        if not tunnel.reverse and (warning := exposed_listener(tunnel)):
            log.warning("%s: %s", tunnel.name, warning)
        handshakes = self.transport.endpoint(tunnel.handshake_port)
        self.service.start_server(run, handshakes, partial(self.answer_handshake, run), f"{tunnel.name} handshake")
        log.info("%s: answering handshakes on %s", tunnel.name, handshakes)
        legs = self.transport.endpoint(tunnel.leg_port)
        if tunnel.mirror:
            listen, handle, far = legs, partial(self.carry_mirror_leg, run), "the VM's listeners it reports"
            self.service.spawn_for(run, self.watch_vm_ports, run)
        elif tunnel.reverse:
            listen, handle, far = legs, partial(self.carry_leg, tunnel, run.stats), tunnel.upstream
        else:
            listen, far = tunnel.peer, legs
            handle = partial(self.carry_client, tunnel, lambda: QueuedForTheHost(legs, run) if run.activated else legs,
                             run.stats)
        server = self.service.start_server(run, listen, handle, tunnel.name, tunnel.max_connections,
                                           clients=not tunnel.reverse)
        run.set_state(f"listening on {server.where}", up=True)
        log.info("%s: listening on %s, carrying to %s", tunnel.name, server.where, far)

    # -- a mirror (mirror-ports): the VM's listeners, each carried from the host (wire: vtunnel_mirror)

    def watch_vm_ports(self, run):
        """Keep run.mirrored the VM's TCP listeners on the entry's ports, but this process's own."""
        tunnel = run.tunnel
        wanted = tunnel.mirror_ports - tunnel.exclude_ports
        while True:
            ports = vtunnel_mirror.listening_ports(wanted, self.service.listener_inodes())
            if ports != run.mirrored:
                log.debug("%s: the VM listens on %s", tunnel.name, ", ".join(map(str, sorted(ports))) or "none of them")
                run.mirrored, changed, run.mirror_changed = ports, run.mirror_changed, gevent.event.Event()
                changed.set()
            gevent.sleep(vtunnel_mirror.POLL_INTERVAL)

    def carry_mirror_leg(self, run, leg, address):
        """A leg of a mirror, once admitted: the host's control stream, or a client for one VM port."""
        tunnel = run.tunnel
        opening = self.admit(tunnel, run.stats, leg, address, lambda: self.read_mirror_opening(run, leg))
        if opening is None:
            return
        kind, port = opening
        if kind == vtunnel_mirror.CONTROL:  # a task of the run's: it ends when a reload retires the run
            run.tasks.spawn(self.report_mirrored, run, leg).join()
            return
        target = TcpEndpoint(vtunnel_mirror.dial_address(run.mirrored[port]), port)
        relay(tunnel, run.stats, self.service.connection_ids.accepted(address), leg,
              target.connect, self.other_end, f"to {target}", leg_is_near=True)

    def read_mirror_opening(self, run, leg):
        """(CONTROL, None) or (LEG, a VM port mirrored now); refuses anything else."""
        try:
            with gevent.Timeout(run.tunnel.connect_timeout):
                kind = vtunnel_trust.read_exactly(leg, vtunnel_mirror.KIND_SIZE)
                if kind == vtunnel_mirror.LEG:
                    port_bytes = vtunnel_trust.read_exactly(leg, 2)
                    if len(port_bytes) < 2:
                        raise vtunnel_trust.LegRefused("no mirror header", "the leg closed before its VM port")
                    port = struct.unpack("!H", port_bytes)[0]
                    if port not in run.mirrored:
                        raise vtunnel_trust.LegRefused("not mirrored", f"VM port {port} is not mirrored now")
                    return kind, port
        except (OSError, gevent.Timeout) as exc:
            raise vtunnel_trust.LegRefused("no mirror header", f"reading what the leg is for: {_reason(exc)}") from None
        if kind != vtunnel_mirror.CONTROL:
            raise vtunnel_trust.LegRefused("no mirror header", "the leg opened with neither a mirror's control "
                                           "stream nor a VM port (another kind of tunnel at the other end?)")
        return kind, None

    def report_mirrored(self, run, control):
        """The control stream: the whole set of mirrored ports now, and again at each change, until the
        host closes it (a reader notices) or a send fails."""
        log.info("%s: the host follows the VM's ports (%d now)", run.tunnel.name, len(run.mirrored))
        closed = gevent.spawn(drain_until_closed, control)
        try:
            while not closed.ready():
                changed = run.mirror_changed
                control.sendall(vtunnel_mirror.ports_line(run.mirrored))
                gevent.wait([changed, closed], count=1)
        except OSError as exc:
            log.info("%s: the control stream ended: %s", run.tunnel.name, _reason(exc))
        finally:
            closed.kill()
            control.close()

    def answer_handshake(self, run, sock, address):
        run.handshake_answered = time.monotonic()
        try:
            sock.sendall(SEED_PHRASE)
            log.debug("answered a handshake")
        except OSError as exc:
            log.warning("handshake: could not send the seed phrase: %s", _reason(exc))
        finally:
            sock.close()


@dataclass(frozen=True)
class QueuedForTheHost(Endpoint):
    """The leg for a client systemd queued before the peer ran (socket activation): the host may not
    listen yet, as it listens only after its handshake with this peer, which it retries every few
    seconds (HANDSHAKE_BACKOFF). Until then, and for a moment after (the host binds right after the
    seed phrase), a refused dial is tried again within the connect timeout, so the first client is
    carried rather than refused."""
    legs: Endpoint
    run: "TunnelRun"

    def __str__(self):
        return str(self.legs)

    def connect(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.legs.connect(max(deadline - time.monotonic(), 0.001))
            except (ConnectionRefusedError, FileNotFoundError):
                answered, left = self.run.handshake_answered, deadline - time.monotonic()
                if left <= 0 or (answered is not None and time.monotonic() - answered > 1.0):
                    raise
                gevent.sleep(min(0.1, left))


class Host(Role):
    """The host end: after a handshake with the peer, a vsock listener per tunnel,
    each connection carried to the tunnel's upstream server.

    Where each VM has its own addresses (Hyper-V), the handshake also finds
    the VM, and a periodic handshake notices when it is gone (WSL's VM gets a
    new GUID at every restart): the tunnel then finds it again and listens anew.
    """

    end, other_end = "host", "peer"

    def __init__(self, transport, service, vm_candidates=None):
        super().__init__(transport, service)
        self.vm_candidates = vm_candidates or candidate_vm_ids
        service.status = self.status

    def dials_upstream(self, tunnel):
        return not tunnel.reverse

    @staticmethod
    def part(tunnel):
        """The keys the host uses: a reload that changes none of them leaves its tunnel alone."""
        return (tunnel.reverse, tunnel.handshake_port, tunnel.leg_port, tunnel.host_listen if tunnel.reverse else
                tunnel.upstream, tunnel.max_connections, tunnel.connect_timeout, tunnel.idle_timeout, tunnel.leg_secret,
                tunnel.proxy_protocol, tunnel.mirror_ports, tunnel.exclude_ports, tunnel.host_port_offset)

    def status(self):
        runs = [run for run in self.service.runs.values() if run.end == self.end]
        return f"{sum(run.up for run in runs)}/{len(runs)} tunnel(s) connected to the peer"

    def start_tunnel(self, run):
        run.set_state("looking for the peer")
        serve = self.serve_mirror if run.tunnel.mirror else self.serve_reverse if run.tunnel.reverse else \
            self.serve_tunnel
        self.service.spawn_for(run, serve, run)

    # -- a mirror: a listener per VM port the peer reports on the control stream

    def serve_mirror(self, run):
        """Follow the peer's control stream and keep a listener for each VM port it reports; when the
        stream ends (the peer restarted, the VM is gone), close them all and look for the peer again."""
        tunnel, listeners = run.tunnel, {}
        while True:
            run.reach = self.wait_for_peer(run)
            try:
                self.follow_control(run, listeners)
            except (OSError, ValueError, gevent.Timeout, vtunnel_trust.LegRefused) as exc:
                problem = _reason(exc)
            log.warning("%s: the control stream ended (%s): closing the %d mirrored port(s); looking for the peer "
                        "again", tunnel.name, problem, len(listeners))
            self.apply_mirrored(run, listeners, {})
            run.set_state("looking for the peer again", up=False)
            self.service.status_changed()
            gevent.sleep(HANDSHAKE_BACKOFF[0])

    def follow_control(self, run, listeners):
        tunnel = run.tunnel
        control = run.reach.endpoint(tunnel.vsock_peer_port).connect(tunnel.connect_timeout)
        try:
            if tunnel.leg_secret:
                self.prove(tunnel, control, vtunnel_trust.prove_as_dialler)
            control.sendall(vtunnel_mirror.CONTROL)
            control.settimeout(MIRROR_RETRY)  # a quiet stream: time to try the ports that could not listen
            pending, ports = b"", {}
            while True:
                try:
                    data = control.recv(65536)
                except socket.timeout:
                    self.apply_mirrored(run, listeners, ports)
                    continue
                if not data:
                    raise ConnectionResetError(errno.ECONNRESET, "the peer closed it")
                pending += data
                if len(pending) > vtunnel_mirror.MAX_LINE:
                    raise ValueError("a control line longer than 1 MiB")
                while b"\n" in pending:
                    line, _, pending = pending.partition(b"\n")
                    ports = self.ports_to_mirror(run, vtunnel_mirror.parse_ports_line(line + b"\n"))
                    self.apply_mirrored(run, listeners, ports)
        finally:
            control.close()

    @staticmethod
    def ports_to_mirror(run, reported):
        """Of the ports the peer reports, those this end's config mirrors (the host's config decides
        where the host listens, whatever a peer says), at most MIRROR_MAX_PORTS of them."""
        tunnel = run.tunnel
        wanted = tunnel.mirror_ports - tunnel.exclude_ports
        ports = {port: address for port, address in reported.items() if port in wanted}
        if len(ports) < len(reported) and "foreign" not in run.mirror_warnings:
            log.warning("%s: the peer reports VM ports this config does not mirror (%s): not listened on (are the "
                        "two ends' configs the same?)", tunnel.name, vtunnel_mirror.describe_ports(
                            set(reported) - set(ports)))
            run.mirror_warnings.add("foreign")
        if len(ports) > MIRROR_MAX_PORTS:
            if "many" not in run.mirror_warnings:
                log.warning("%s: the VM listens on %d mirrored ports; the host listens for the first %d", tunnel.name,
                            len(ports), MIRROR_MAX_PORTS)
                run.mirror_warnings.add("many")
            ports = dict(sorted(ports.items())[:MIRROR_MAX_PORTS])
        return ports

    def apply_mirrored(self, run, listeners, ports):
        """Make `listeners` ({VM port: (server, VM address)}) the listeners `ports` ({VM port: VM
        address}) asks for: close the gone, open the new. One that cannot listen is warned about once,
        and tried again at the next report or after MIRROR_RETRY."""
        tunnel = run.tunnel
        for port in [port for port in listeners if listeners[port][1] != ports.get(port)]:
            server, _ = listeners.pop(port)
            server.close()
            log.info("%s: VM port %d is gone: no longer listening on %s%s", tunnel.name, port, server.where,
                     f"; {len(server.pool)} open connection(s) have {self.service.grace:g}s to finish"
                     if len(server.pool) else "")
            self.service.greenlets.spawn(self.finish_port, run, server)
        for port, address in sorted(ports.items()):
            if port not in listeners:
                self.mirror_port(run, listeners, port, address)
        run.failed_ports = {port: reason for port, reason in run.failed_ports.items() if port in ports}
        run.mirrored = {port: address for port, (_, address) in listeners.items()}
        waiting = f"; {len(run.failed_ports)} cannot listen" if run.failed_ports else ""
        run.set_state(f"connected to the peer; mirroring {len(listeners)} VM port(s) on {tunnel.host_listen.host}"
                      f"{waiting}", up=True)
        self.service.status_changed()

    def finish_port(self, run, server):
        """A closed port's open connections have the grace period to finish; then it is forgotten. Until
        then it stays among the run's servers, so a stop or a reload finishes it as it does the others."""
        finish_connections([server], self.service.grace, PortGone)
        if server in run.servers:  # (a retirement may have closed them all)
            run.servers.remove(server)

    def mirror_port(self, run, listeners, port, address):
        tunnel = run.tunnel
        endpoint = TcpEndpoint(tunnel.host_listen.host, port + tunnel.host_port_offset)
        try:
            if not 1 <= endpoint.port <= 65535:
                raise StartupError(f"host-port-offset {tunnel.host_port_offset:+d} makes it {endpoint.port}, "
                                   "not a TCP port")
            server = self.service.start_server(run, endpoint, partial(
                self.carry_client, tunnel, lambda: run.reach.endpoint(tunnel.vsock_peer_port), run.stats,
                leg_header=vtunnel_mirror.leg_header(port)), f"{tunnel.name} {port}", tunnel.max_connections)
        except StartupError as exc:
            if run.failed_ports.get(port) != str(exc):
                log.warning("%s: VM port %d (%s) cannot be mirrored: %s; trying again later", tunnel.name, port,
                            address, exc)
            run.failed_ports[port] = str(exc)
            return
        run.failed_ports.pop(port, None)
        listeners[port] = (server, address)
        log.info("%s: VM port %d (%s) mirrored: listening on %s", tunnel.name, port, address, server.where)

    def serve_tunnel(self, run):
        tunnel = run.tunnel
        while True:
            transport = self.wait_for_peer(run)
            legs = transport.endpoint(tunnel.vsock_host_port)
            server = self.service.start_server(run, legs, partial(self.carry_leg, tunnel, run.stats), tunnel.name,
                                               tunnel.max_connections)
            log.info("%s: listening on %s, carrying to %s", tunnel.name, legs, tunnel.upstream)
            run.set_state(f"connected to the peer; listening on {legs}", up=True)
            self.service.status_changed()
            if not transport.per_vm:
                return
            self.watch_peer(run, transport, server)
            server.close()  # open connections run on; new ones go to wherever the peer is now
            run.set_state("looking for the peer again", up=False)
            self.service.status_changed()
            log.warning("%s: the peer at %s stopped answering; looking for it again", tunnel.name, transport)

    def serve_reverse(self, run):
        """A reverse tunnel: once the peer answers, listen where the config says, and carry each
        client to the peer's vsock port in whichever VM the peer is now. The listener stays open
        while the peer is looked for again (after a WSL restart): its clients are closed at once."""
        tunnel = run.tunnel
        if warning := exposed_listener(tunnel):
            log.warning("%s: %s", tunnel.name, warning)
        run.reach = self.wait_for_peer(run)
        server = self.service.start_server(run, tunnel.host_listen, partial(
            self.carry_client, tunnel, lambda: run.reach.endpoint(tunnel.vsock_peer_port), run.stats), tunnel.name,
            tunnel.max_connections, clients=True)
        log.info("%s: listening on %s, carrying to %s", tunnel.name, server.where,
                 run.reach.endpoint(tunnel.vsock_peer_port))
        while True:
            run.set_state(f"connected to the peer; listening on {server.where}", up=True)
            self.service.status_changed()
            if not run.reach.per_vm:
                return
            self.watch_peer(run, run.reach, server)
            if not server.started:
                return
            run.set_state("looking for the peer again", up=False)
            self.service.status_changed()
            log.warning("%s: the peer at %s stopped answering; looking for it again", tunnel.name, run.reach)
            run.reach = self.wait_for_peer(run)

    def wait_for_peer(self, run):
        """Handshake until a peer answers, and return the transport that reaches it."""
        tunnel = run.tunnel
        delay, longest = HANDSHAKE_BACKOFF
        for attempt in itertools.count(1):
            transport, problem = self.find_peer(tunnel)
            if transport:
                log.info("%s: handshake with the peer at %s succeeded", tunnel.name,
                         transport.endpoint(tunnel.handshake_port))
                return transport
            log.info("%s: handshake attempt %d with %s: %s; retrying in %.2gs", tunnel.name,
                     attempt, self.transport.endpoint(tunnel.handshake_port), problem, delay)
            run.set_state(f"waiting for the peer (handshake attempt {attempt}: {problem})",
                          error=f"handshake: {problem}")
            gevent.sleep(delay)
            delay = min(delay * 2, longest)

    def find_peer(self, tunnel):
        """(transport, None) once a peer answers the seed phrase, else (None, the problem)."""
        if not self.transport.per_vm or self.transport.vm_id:
            problem = handshake(self.transport.endpoint(tunnel.handshake_port))
            return (None, problem) if problem else (self.transport, None)
        candidates = self.vm_candidates()
        if not candidates:
            return None, "no running VM found (no ComputeSystem entries, no id from wsl.exe)"
        vm_id = find_vm(self.transport, tunnel.handshake_port, candidates)
        if vm_id is None:
            return None, f"no peer answered in any of {len(candidates)} VM(s)"
        return self.transport.for_vm(vm_id), None

    def watch_peer(self, run, transport, server):
        """Return once the peer stops answering twice in a row, or the listener fails."""
        tunnel, misses = run.tunnel, 0
        while server.started and misses < 2:
            gevent.sleep(PEER_CHECK_INTERVAL)
            problem = handshake(transport.endpoint(tunnel.handshake_port))
            misses = misses + 1 if problem else 0
            run.set_state(run.state, up=not problem, error=problem and f"periodic handshake: {problem}")
            if problem:
                log.info("%s: periodic handshake with %s: %s", tunnel.name, transport, problem)
            else:
                log.debug("%s: periodic handshake with %s: answered", tunnel.name, transport)


def exchange_hint(tunnel, pump, leg_is_near):
    """For the failure line of a leg this end carried without a secret: a dialler with leg-secret-file
    sends its hello, finds no proof in what comes back, and closes the leg outright."""
    hello_only = pump.failure[0] == "left" and pump.sent[0] == vtunnel_trust.HELLO_SIZE
    if tunnel.leg_secret or not leg_is_near or not hello_only:
        return ""
    return ("; the leg carried just the size of a leg-exchange hello: if the other end has a leg-secret-file, this "
            "end has no leg-secret-file: set it, to the same secret, at both ends")


def drain_until_closed(sock):
    """Read and drop until the other end closes or fails: how a writer notices a reader gone."""
    try:
        while sock.recv(4096):
            pass
    except OSError:
        pass


def client_addresses(sock):
    """(family, the client's address, the address it connected to) of an accepted client, or None
    where there are none to tell (a named pipe)."""
    family = getattr(sock, "family", None)
    if family not in {socket.AF_INET, socket.AF_INET6, getattr(socket, "AF_UNIX", socket.AF_INET)}:
        return None
    try:
        return family, sock.getpeername(), sock.getsockname()
    except OSError:
        return None


def opens_with_the_leg_exchange(leg):
    """Whether the bytes waiting on a leg start with a dialler's leg exchange (looked at without taking
    them, and without waiting: a gevent socket with timeout 0 does not wait)."""
    if not is_polled(leg):
        return False
    timeout = leg.gettimeout()
    leg.settimeout(0)
    try:
        return vtunnel_trust.opens_with_the_exchange(leg.recv(len(vtunnel_trust.MAGIC), socket.MSG_PEEK))
    except OSError:
        return False
    finally:
        leg.settimeout(timeout)


def handshake(endpoint):
    """Dial the peer's handshake endpoint and check the seed; None on success, else the problem."""
    try:
        sock = endpoint.connect(HANDSHAKE_TIMEOUT)
    except (OSError, gevent.Timeout) as exc:
        return _reason(exc)
    try:
        with gevent.Timeout(HANDSHAKE_TIMEOUT):
            seed = vtunnel_trust.read_exactly(sock, len(SEED_PHRASE))
    except (OSError, gevent.Timeout) as exc:
        return f"reading the seed phrase: {_reason(exc)}"
    finally:
        sock.close()
    if seed != SEED_PHRASE:
        return f"the peer answered {len(seed)} bytes that are not the seed phrase"
    return None


# --------------------------------------------------------------------------
# 9. Finding the VM (Windows): every running VM is a candidate
# --------------------------------------------------------------------------

COMPUTE_SYSTEM_KEY = r"SOFTWARE\Microsoft\Windows NT\CurrentVersion\HostComputeService\VolatileStore\ComputeSystem"
GUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")


def registry_vm_ids():
    """The GUID-named subkeys of ComputeSystem: one per running Hyper-V compute system."""
    try:
        import winreg
        key = winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, COMPUTE_SYSTEM_KEY)
    except (ImportError, OSError):
        return []
    names = []
    with key:
        for index in itertools.count():
            try:
                names.append(winreg.EnumKey(key, index))
            except OSError:
                break
    return [name.strip("{}") for name in names if GUID.fullmatch(name.strip("{}"))]


def wsl_vm_id():
    """What `wsl.exe -- wslinfo --vm-id` prints (WSL 2.0+): the VM when the registry lists none."""
    try:
        command = ["wsl.exe", "--", "wslinfo", "--vm-id"]
        done = vtunnel_npipe.run_in_thread(vtunnel_npipe.dials(), partial(subprocess.run, command,
                                                                        capture_output=True, timeout=15))
    except (OSError, subprocess.SubprocessError):
        return None
    found = GUID.search(done.stdout.decode("utf-8", "replace"))
    return found[0] if found else None


def candidate_vm_ids():
    return registry_vm_ids() or [vm_id for vm_id in [wsl_vm_id()] if vm_id]


def find_vm(transport, port, candidates):
    """Handshake every candidate VM at once; the first whose peer answers the seed phrase wins."""
    attempts = {gevent.spawn(handshake, transport.for_vm(vm_id).endpoint(port)): vm_id for vm_id in candidates}
    try:
        for attempt in gevent.iwait(attempts):
            if attempt.successful() and attempt.value is None:
                return attempts[attempt]
            log.debug("handshake with VM %s: %s", attempts[attempt], attempt.value or attempt.exception)
    finally:
        gevent.killall(list(attempts), block=False)
    return None


# --------------------------------------------------------------------------
# 10. Command line
# --------------------------------------------------------------------------

LOG_LEVELS = ("debug", "info", "warning", "error")


def check_transport(tunnels, transport):
    transport.check_available()
    for tunnel in tunnels:
        for port in (tunnel.handshake_port, tunnel.leg_port):
            if port > transport.max_port:
                raise UsageError(f"tunnel {tunnel.name!r}: vsock port {port} does not fit the "
                                 f"{transport} transport, whose ports stop at {transport.max_port}")


def unavailable_on_host(tunnel):
    """(key, endpoint, why) when a host on this platform cannot dial the tunnel's upstream or listen
    where it says; else None."""
    key, endpoint = ("host-listen-address", tunnel.host_listen) if tunnel.reverse else ("upstream", tunnel.upstream)
    if isinstance(endpoint, PipeEndpoint) and not vtunnel_npipe.AVAILABLE:
        return key, endpoint, vtunnel_npipe.CANNOT_LISTEN_REASON if tunnel.reverse else vtunnel_npipe.UNAVAILABLE_REASON
    return None


def exposed_listener(tunnel):
    """Why the address the tunnel's clients connect to deserves a warning, or None."""
    if tunnel.clients_at.is_loopback:
        return None
    reached = ("every VM port it mirrors" if tunnel.mirror else f"{tunnel.upstream} in the VM" if tunnel.reverse
               else f"{tunnel.upstream} through the host")
    return f"{tunnel.clients_at} is not a loopback address: anyone who can reach it reaches {reached}"


def check_host_side(tunnels):
    for tunnel in tunnels:
        if problem := unavailable_on_host(tunnel):
            key, endpoint, reason = problem
            raise StartupError(f"tunnel {tunnel.name!r}: {key} {endpoint}: {reason}")


def load_checked_config(path, transport, host_side):
    """The config's tunnels, once everything this end will need of them is there: at start and
    at every reload."""
    tunnels = load_config(path)
    check_transport(tunnels, transport)
    if host_side:
        check_host_side(tunnels)
    return tunnels


def config_warnings(tunnels):
    """What `check` tells beside the table: what peer, host or local would refuse or warn about here."""
    for tunnel in tunnels:
        if problem := unavailable_on_host(tunnel):
            key, endpoint, reason = problem
            yield f"tunnel {tunnel.name!r}: a host here would refuse {key} {endpoint}: {reason}"
        if warning := exposed_listener(tunnel):
            yield f"tunnel {tunnel.name!r}: {warning}"


def format_table(tunnels):
    rows = [("NAME", "DIRECTION", "HANDSHAKE", "VSOCK", "LISTEN", "UPSTREAM", "LEGS")]
    for t in tunnels:
        vsock_end, listen_end, upstream = ("peer", "host", f"{t.upstream} (in the VM)") if t.reverse else (
            "host", "peer", str(t.upstream))
        listen = f"{listen_end} {t.clients_at}"
        if t.mirror:
            offset = f"{t.host_port_offset:+d}" if t.host_port_offset else ""
            listen = f"host {format_host_port(t.host_listen.host, 'PORT' + offset)}"
            upstream = f"the VM's listeners on {vtunnel_mirror.describe_ports(t.mirror_ports - t.exclude_ports)}"
        rows.append((t.name, t.direction, str(t.handshake_port), f"{vsock_end}:{t.leg_port}",
                     listen, upstream, "secret" if t.leg_secret else "open"))
    return "\n".join(format_rows(rows))


def format_rows(rows):
    """Rows of cells as lines of aligned columns, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


COMMANDS = ("peer", "host", "local", "check", "status", "reload")


def parse_args(argv):
    import docopt
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = docopt.docopt(__doc__, argv=argv, version=f"vtunnel {__version__}")
    except docopt.DocoptExit as exc:
        raise UsageError(_usage_problem(argv, str(exc))) from None
    level = args["--log-level"]
    if level.lower() not in LOG_LEVELS:
        raise UsageError(f"--log-level {level}: expected one of {', '.join(LOG_LEVELS)}")
    for option in ("--grace", "--stats-interval"):
        args[option] = _seconds_option(option, args[option])
    if args["--metrics"] is not None:
        args["--metrics"] = metrics_endpoint(args["--metrics"])
    return args


def metrics_endpoint(address):
    """--metrics ADDRESS -> its TcpEndpoint or UnixEndpoint, or UsageError saying what was expected."""
    try:
        endpoint = parse_upstream(address)
    except ValueError as exc:
        raise UsageError(f"--metrics {address}: {exc}") from None
    if isinstance(endpoint, PipeEndpoint):
        raise UsageError(f"--metrics {address}: expected IP:PORT or unix:///PATH, not a named pipe")
    return endpoint


def _seconds_option(option, text):
    try:
        seconds = float(text)
    except ValueError:
        seconds = None
    if seconds is None or not 0 <= seconds < 1e9:  # also refuses nan
        raise UsageError(f"{option} {text}: expected a number of seconds, 0 or more")
    return seconds


def _usage_problem(argv, message):
    """What is wrong with the command line, in words, followed by the usage lines.

    docopt only says that nothing matched; the usual mistakes are named here.
    """
    usage = "Usage:\n" + __doc__.split("Usage:\n", 1)[1].split("\n\n", 1)[0]
    words = [word for word in argv if not word.startswith("-")]
    command = words[0] if words else None
    if not argv:
        problem = f"say what to run: {', '.join(COMMANDS[:-1])} or {COMMANDS[-1]} (vtunnel --help explains each)"
    elif command not in COMMANDS and not argv[0].startswith("-"):
        problem = f"unknown command {command!r}: expected {', '.join(COMMANDS[:-1])} or {COMMANDS[-1]}"
    elif command in ("status", "reload") and not any(word.startswith("--metrics") for word in argv):
        problem = f"vtunnel {command} needs --metrics ADDRESS, where the running vtunnel serves its metrics"
    elif command in COMMANDS[:4] and not any(word.startswith("--config-path") for word in argv):
        problem = f"vtunnel {command} needs --config-path PATH, the YAML file with the tunnels"
    elif command != "host" and "--vm-id" in argv:
        problem = "--vm-id names the VM a Hyper-V host serves: it goes with vtunnel host only"
    elif command == "local" and any(word.split("=")[0] == "--vsock" for word in argv):
        problem = "vtunnel local takes no --vsock: its two ends always meet over tcp:127.0.0.1"
    else:
        first = message.partition("\n")[0]
        unmatched = re.findall(r"\w+\(None, '([^']+)'", first)
        problem = "unexpected or incomplete: " + " ".join(unmatched) if unmatched else first
    return f"bad command line: {problem}\n{usage}"


def run(args):
    problem = gevent_problem()
    if problem:
        raise StartupError(problem)
    if args["status"]:
        return show_status(args["--metrics"])
    if args["reload"]:
        return ask_reload(args["--metrics"])
    if args["check"]:
        tunnels = load_config(args["--config-path"])
        print(format_table(tunnels))
        for warning in config_warnings(tunnels):
            print(f"vtunnel: warning: {warning}", file=sys.stderr)
        return EXIT_OK
    service = Service(grace=args["--grace"], stats_interval=args["--stats-interval"],
                      config_path=args["--config-path"])
    if args["local"]:
        transport = TcpTransport("127.0.0.1")
        service.connection_ids.share_between_ends()
        roles = [Peer(transport, service), Host(transport, service)]
    else:
        transport = parse_transport(args["--vsock"]) if args["--vsock"] else default_transport()
        if args.get("--vm-id"):
            if not GUID.fullmatch(args["--vm-id"].strip("{}")):
                raise UsageError(f"--vm-id {args['--vm-id']}: expected a VM GUID such as "
                                 "3f2504e0-4f89-11d3-9a0c-0305e82c3301")
            if not transport.per_vm:
                raise UsageError(f"--vm-id picks a Hyper-V VM: it goes with --vsock hyperv, not {transport}")
            transport = transport.for_vm(args["--vm-id"].strip("{}"))
        roles = [(Peer if args["peer"] else Host)(transport, service)]
    service.load_tunnels = partial(load_checked_config, transport=transport, host_side=not args["peer"])
    tunnels = service.load_tunnels(args["--config-path"])  # nothing opens before it all checks out
    log.info("vtunnel %s %s: %d tunnel(s) over %s, up to %s open files", __version__,
             "local" if args["local"] else "peer" if args["peer"] else "host", len(tunnels), transport,
             raise_descriptor_limit() or "unlimited")
    service.handle_signals()
    try:
        service.activated = ActivatedSockets()
        listeners = {t.name: t.clients_at for t in tunnels if any((r.end == "peer") != t.reverse for r in roles)}
        service.activated.warn_unmatched({**listeners, **({"metrics": args["--metrics"]} if args["--metrics"] else {})})
        service.start(roles, tunnels)
        if args["--metrics"]:
            service.serve_metrics(args["--metrics"])
    except (StartupError, UsageError):
        service.close()  # what did start is closed, and its socket files are removed
        raise
    service.ready()
    return service.run()


def ask_service(endpoint, path, method="GET"):
    """Ask the vtunnel serving --metrics ENDPOINT (metrics_endpoint's): (HTTP status, the JSON it answered)."""
    import http.client
    connection = http.client.HTTPConnection("localhost")
    try:
        connection.sock = endpoint.connect(CONNECT_TIMEOUT)
        connection.sock.settimeout(ASK_TIMEOUT)  # a reload may wait for its tunnels to listen: bounded
        connection.request(method, path, headers={"X-Vtunnel": "reload"} if method == "POST" else {})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    except (OSError, gevent.Timeout, http.client.HTTPException, ValueError) as exc:
        raise StartupError(f"cannot ask a vtunnel at {endpoint}: {_reason(exc)} (is one running there "
                           f"with --metrics {endpoint}?)") from None
    finally:
        connection.close()


def show_status(address):
    _, status = ask_service(address, "/status")
    print(format_status(status))
    return EXIT_OK


def format_status(status):
    """/status as a person reads it: a line for the process, a row per tunnel and end, the errors."""
    reloads = ", ".join(f"{count} {result}" for result, count in status["reloads"].items())
    rows = [("TUNNEL", "END", "UP", "OPEN", "TOTAL", "SENT", "RECEIVED", "FAILED", "STATE")]
    for tunnel in status["tunnels"]:
        sent, received = tunnel["bytes"].values()
        rows.append((tunnel["tunnel"], tunnel["end"], "yes" if tunnel["up"] else "no", str(tunnel["open"]),
                     str(tunnel["total"]), format_bytes(sent), format_bytes(received),
                     str(sum(tunnel["failures"].values())), tunnel["state"]))
    lines = [f"{status['status']}; reloads: {reloads}", "", *format_rows(rows)]
    for tunnel in status["tunnels"]:
        if tunnel.get("mirrored") and tunnel["end"] == "host":
            lines += ["", f"{tunnel['tunnel']} mirrors:"] + [f"  VM {m['vm']} port {port} -> host {m['host']}"
                                                             for port, m in tunnel["mirrored"].items()]
        for port, why in tunnel.get("cannot_listen", {}).items():
            lines.append(f"  VM port {port}: cannot listen: {why}")
    errors = [f"  {t['tunnel']} ({t['end']}): {t['last_error']}" for t in status["tunnels"] if t["last_error"]]
    return "\n".join(lines + (["", "last errors:"] + errors if errors else []))


def format_bytes(count):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def ask_reload(address):
    code, outcome = ask_service(address, "/reload", "POST")
    if outcome.get("result") == "invalid":
        print("\n".join(f"vtunnel: {problem}" for problem in outcome["problems"]), file=sys.stderr)
        print("vtunnel: the config has problems: nothing changed", file=sys.stderr)
        return EXIT_USAGE
    if code != 200 or outcome.get("result") not in ("ok", "pending"):
        print(f"vtunnel: reload: {outcome.get('result')}: {', '.join(outcome.get('failed', []))} could not start "
              "(the running vtunnel's log says why)", file=sys.stderr)
        return EXIT_FAILURE
    print("reloaded: " + ", ".join(f"{len(outcome[kind])} {kind}" + (f" ({', '.join(outcome[kind])})"
                                   if outcome[kind] else "") for kind in ("added", "changed", "removed"))
          + f", {outcome['kept']} kept")
    if outcome.get("pending"):
        print(f"waiting for the other end: {', '.join(outcome['pending'])} (they listen once it answers; "
              "vtunnel status shows when)")
    return EXIT_OK


def main(argv=None):
    try:
        args = parse_args(argv)
        logging.basicConfig(level=args["--log-level"].upper(), stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(message)s")
        return run(args)
    except ConfigError as exc:
        print("\n".join(f"vtunnel: {error}" for error in exc.errors), file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"vtunnel: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StartupError as exc:
        print(f"vtunnel: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_OK
    except ModuleNotFoundError as exc:  # docopt, imported when the command line is read
        print(f"vtunnel: this Python ({sys.executable}) has no module {exc.name!r}: pip install docopt-ng",
              file=sys.stderr)
        return EXIT_FAILURE


def main_exit():
    sys.exit(main())


if __name__ == "__main__":
    main_exit()
