"""vtunnel beside socat and beside direct loopback, in one run, against the same upstreams.

    python test/bench/bench.py [--out FILE.md] [--seconds N] [--rounds N] [--configs A,B,...]
                               [--base CONFIG] [--clients N]

"socat vsock" and "vtunnel vsock" go over real AF_VSOCK (a TCP listener, vsock to CID 1, TCP to the
upstream): only inside the throwaway guest of test/vsockvm.sh (`tox -e bench-vsock`), where CID 1 is
loopback; anywhere else they are refused, since a vsock connection would reach the hypervisor.

A configuration named "vtunnel=PATH tcp" runs the vtunnel.py at PATH (another checkout) instead of
this one, so a change is measured before and after side by side in one run. vtunnel runs with
--log-level warning; "vtunnel tcp info" (any vtunnel configuration, then a level) runs it at that level;
"vtunnel tcp secret" gives every tunnel a leg-secret-file, so each leg authenticates.

Every configuration first proves it carries bytes intact (SHA-256 both ways), then is measured:
bulk throughput each way and over 100 streams (iperf3), 64-byte round trips, new connections per
second (sequential and 50 at once), memory per idle connection (PSS of the relay processes) and CPU
seconds per GiB moved (the whole machine's, and the relays' own). Needs socat and iperf3: installs
them with apt-get when it can, else skips what needs them and says so.

A second table, "interactive under load" (--loaded, on by default; --loaded-only for just this one),
asks what a user running ssh or a database beside a `docker pull` feels: 64-byte round trips with 2 ms
between them through one tunnel (p50, p99, p99.9), idle and while iperf3 runs 1, 4 and 16 bulk streams
through another tunnel of the same processes (with the bulk Gbit/s reached meanwhile), and PostgreSQL's
`pgbench -S` (8 clients) through a third tunnel, idle and beside 4 bulk streams, against a PostgreSQL the
benchmark starts on loopback (installed with apt-get when missing, else its rows are skipped).
"""

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

try:
    import gevent
    import gevent.pool
    import gevent.socket
except ModuleNotFoundError as exc:  # run by a Python outside the venv (tox -e bench makes one)
    sys.exit(f"bench: this Python ({sys.executable}) has no module {exc.name!r}: run tox -e bench, or use the "
             "Python of a venv with vtunnel's dependencies (pip install -e '.[test]')")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CONFIGS = ["direct", "socat", "socat -b 262144", "vtunnel tcp", "vtunnel unix", "vtunnel local"]
BASE = "socat -b 262144"
_vsock_ports = iter(range(20000, 30000))


def in_vsock_guest():
    try:
        return "vsockvm_guest=1" in Path("/proc/cmdline").read_text().split()
    except OSError:
        return False


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin():
    """The folder of PostgreSQL's server programs (Debian keeps them out of PATH), or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else None


def ensure_tools(postgres=False):
    wanted = {"socat": "socat", "iperf3": "iperf3"}
    if postgres:
        wanted["pgbench"] = "postgresql"
    present = lambda tool: bool(shutil.which(tool) or (tool == "pgbench" and postgres_bin()))  # noqa: E731
    missing = [package for tool, package in wanted.items() if not present(tool)]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"bench: installing {' '.join(missing)}", file=sys.stderr)
        subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                       f"--no-install-recommends {' '.join(missing)} >/dev/null", shell=True, check=False)
    return {tool: present(tool) for tool in wanted}


# ------------------------------------------------------------------ processes

class Chain:
    """One configuration: the processes between a client port and an upstream port."""

    def __init__(self, name, upstreams, tmp):
        """upstreams: the echo port first (it proves readiness), then any others."""
        self.name, self.procs, self.log = name, [], None
        if name == "direct":
            self.ports = list(upstreams)
            return
        self.ports = [free_port() for _ in upstreams]
        if name.endswith(" vsock") and not in_vsock_guest():
            raise RuntimeError(f"{name}: real AF_VSOCK only inside the guest of test/vsockvm.sh (tox -e bench-vsock)")
        if name == "socat vsock":  # the chain users build by hand: TCP -> vsock -> TCP, socat's largest buffer
            for port, upstream in zip(self.ports, upstreams, strict=True):
                vsock_port = next(_vsock_ports)
                self.procs.append(subprocess.Popen(
                    ["socat", "-b", "262144", f"VSOCK-LISTEN:{vsock_port},fork,backlog=4096",
                     f"TCP:127.0.0.1:{upstream},nodelay"],
                    stderr=subprocess.DEVNULL))
                self.procs.append(subprocess.Popen(
                    ["socat", "-b", "262144", f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr,backlog=4096",
                     f"VSOCK-CONNECT:1:{vsock_port}"], stderr=subprocess.DEVNULL))
        elif name.startswith("socat"):
            extra = name.split()[1:]
            for port, upstream in zip(self.ports, upstreams, strict=True):
                middle = free_port()
                for listen, target in ((port, middle), (middle, upstream)):
                    self.procs.append(subprocess.Popen(
                        ["socat", *extra, f"TCP-LISTEN:{listen},bind=127.0.0.1,fork,reuseaddr,backlog=4096",
                         f"TCP:127.0.0.1:{target},nodelay"], stderr=subprocess.DEVNULL))
        else:
            vsock_port = (lambda: next(_vsock_ports)) if name.endswith(" vsock") else free_port
            config = Path(tmp) / f"config-{len(os.listdir(tmp))}.yaml"
            # "vtunnel tcp secret": every leg authenticates (leg-secret-file): what the exchange costs.
            words = name.split()[2:]
            secret = ""
            if "secret" in words:
                secret_file = config.with_suffix(".secret")
                secret_file.write_text(os.urandom(32).hex())
                secret_file.chmod(0o600)
                secret = f"    leg-secret-file: {secret_file}\n"
            config.write_text("tunnel:\n" + "".join(
                f"  - name: bench{i}\n    handshake-port: {vsock_port()}\n    vsock-host-port: {vsock_port()}\n"
                f"    peer-address: 127.0.0.1\n    peer-port: {port}\n"
                f"    upstream-server-address: 127.0.0.1:{upstream}\n{secret}"
                for i, (port, upstream) in enumerate(zip(self.ports, upstreams, strict=True))))
            # "vtunnel tcp info" runs at --log-level info, as users do by default: the price of its two
            # log lines per connection and end. Without a level word, warning: no line per connection.
            level = next((word for word in words if word != "secret"), "warning")
            common = ["--config-path", str(config), "--log-level", level]
            # "vtunnel=PATH tcp" runs another tree's vtunnel.py: a before/after in one run.
            script = name.split()[0].partition("=")[2] or ROOT / "vtunnel.py"
            cmd = [sys.executable, str(script)]
            kind = name.split()[1]
            # Below warning, the log goes to a file (as journald or a redirect would take it), not the console.
            log = self.log = open(config.with_suffix(".log"), "w") if level != "warning" else None  # noqa: SIM115
            if kind == "local":
                roles = [["local"]]
            elif kind == "vsock":  # the peer on its default transport (AF_VSOCK), the host dialling CID 1
                roles = [["peer"], ["host", "--vsock", "vsock:1"]]
            else:
                transport = "tcp:127.0.0.1" if kind == "tcp" else f"unix:{tempfile.mkdtemp(dir='/tmp')}/v"
                roles = [["peer", "--vsock", transport], ["host", "--vsock", transport]]
            self.procs += [subprocess.Popen(cmd + role + common, stderr=log) for role in roles]
        self.wait_ready()
        time.sleep(1)  # the other tunnels' handshakes run beside the first one's

    @property
    def port(self):
        return self.ports[0]

    def wait_ready(self):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if round_trip_once(self.port, b"ready?") == b"ready?":
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name}: not ready")

    def pids(self):
        """The relay processes and their children (socat forks one per connection)."""
        found = {p.pid for p in self.procs}
        for _ in range(2):
            for pid in os.listdir("/proc"):
                if pid.isdigit():
                    try:
                        ppid = int(stat_fields(pid)[1])
                    except (OSError, IndexError):
                        continue
                    if ppid in found:
                        found.add(int(pid))
        return found

    def cpu_seconds(self):
        """User+system CPU of the relays, including reaped children (socat's forks)."""
        total = 0
        for proc in self.procs:
            total += sum(int(f) for f in stat_fields(proc.pid)[11:15])
        return total / os.sysconf("SC_CLK_TCK")

    def sum_over_processes(self, read):
        """read(pid) summed over the relay processes and their children; one that has just ended adds nothing."""
        total = 0
        for pid in self.pids():
            try:
                total += read(pid)
            except OSError:
                continue
        return total

    def pss_kib(self):
        return self.sum_over_processes(
            lambda pid: int(Path(f"/proc/{pid}/smaps_rollup").read_text().split("Pss:")[1].split()[0]))

    def descriptors(self):
        return self.sum_over_processes(lambda pid: len(os.listdir(f"/proc/{pid}/fd")))

    def stop(self):
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.log:
            self.log.close()


class Upstreams:
    """The echo server, (with iperf3) the iperf3 server and (with PostgreSQL) a database that every
    configuration leads to: each configuration has a tunnel to each, in this order."""

    def __init__(self, iperf=True, postgres=False):
        self.tmp = tempfile.mkdtemp(prefix="vtbench")
        self.echo = subprocess.Popen([sys.executable, str(HERE / "upstream.py")], stdout=subprocess.PIPE,
                                     text=True)
        self.echo_port = int(self.echo.stdout.readline())
        self.iperf_port = free_port()
        self.iperf = subprocess.Popen(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(self.iperf_port)],
                                      stdout=subprocess.DEVNULL) if iperf else None
        self.postgres = Postgres() if postgres else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.echo.kill()
        if self.iperf:
            self.iperf.kill()
        if self.postgres:
            self.postgres.stop()

    def chain(self, name):
        ports = [self.echo_port, self.iperf_port] + ([self.postgres.port] if self.postgres else [])
        return Chain(name, ports, self.tmp)


class Postgres:
    """A throwaway PostgreSQL on loopback (trust, no fsync) holding pgbench's tables at scale 10."""

    def __init__(self):
        bindir = postgres_bin()
        self.dir, self.port = Path(tempfile.mkdtemp(prefix="vtbench-pg")), free_port()
        as_user = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root; Debian's package made this user
            shutil.chown(self.dir, "postgres")
            as_user = ["runuser", "-u", "postgres", "--"]
        data = self.dir / "data"
        subprocess.run(as_user + [bindir / "initdb", "-D", data, "--auth=trust", "-U", "bench"],
                       check=True, capture_output=True)
        self.proc = subprocess.Popen(
            as_user + [bindir / "postgres", "-D", data, "-p", str(self.port), "-k", self.dir,
                       "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "max_connections=200"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pgbench = shutil.which("pgbench") or str(bindir / "pgbench")
        deadline = time.monotonic() + 60
        while subprocess.run([self.pgbench, "-i", "-q", "-s", "10", *self.connect(self.port)],
                             capture_output=True).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError("PostgreSQL did not start")
            time.sleep(0.5)

    @staticmethod
    def connect(port):
        return ["-h", "127.0.0.1", "-p", str(port), "-U", "bench", "postgres"]

    def tps(self, port, seconds):
        """pgbench -S (select only), 8 clients, through `port`: transactions per second."""
        done = subprocess.run([self.pgbench, "-n", "-S", "-c", "8", "-j", "2", "-T", str(int(seconds)),
                               *self.connect(port)], capture_output=True, text=True, timeout=seconds * 4 + 60)
        for line in done.stdout.splitlines():
            if line.startswith("tps = "):
                return float(line.split()[2])
        raise RuntimeError(f"pgbench: {done.stderr.strip() or done.stdout.strip()}")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def stat_fields(pid):
    """The fields of /proc/PID/stat after the command's name: state, ppid, ... (utime is [11])."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


# ------------------------------------------------------------------ measurements

def machine_ticks():
    """The machine's clock ticks since boot: user, nice, system, idle, iowait, irq, softirq, steal, ..."""
    return [int(f) for f in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]


def machine_busy_seconds():
    """CPU seconds all cores spent not idle since boot: relays, iperf3 and the kernel's softirq work."""
    ticks = machine_ticks()
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle and iowait


def round_trip_once(port, data):
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: s.recv(65536), b""))


def integrity(port):
    """16 MiB each way through the chain (an echo), full duplex: "yes" when what came back has the
    SHA-256 of what went in, else what went wrong (a relay that stalls for 60 s is "no: timed out")."""
    payload = os.urandom(16 * 1024 * 1024)
    got = hashlib.sha256()

    def send():
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
    try:
        sock = gevent.socket.create_connection(("127.0.0.1", port), timeout=60)
    except OSError as exc:
        return f"no: {exc}"
    sender = gevent.spawn(send)
    try:
        while data := sock.recv(262144):
            got.update(data)
        sender.get()
    except OSError as exc:
        return f"no: {exc}"
    finally:
        sender.kill()
        sock.close()
    return "yes" if got.digest() == hashlib.sha256(payload).digest() else "no: corrupted"


def iperf(port, seconds, reverse=False, streams=1):
    args = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J", "-P", str(streams)]
    for _ in range(20):  # the server takes one test at a time, and may still be ending the last one
        done = subprocess.run(args + (["-R"] if reverse else []), capture_output=True, text=True,
                              timeout=seconds * 4 + 60)  # a hung relay ends the run with an error, not never
        result = json.loads(done.stdout)
        if "busy" not in result.get("error", ""):
            break
        time.sleep(0.5)
    if "error" in result:
        raise RuntimeError(result["error"])
    end = result["end"]
    per_stream = [s["receiver"]["bits_per_second"] for s in end["streams"]]
    return end["sum_received"]["bits_per_second"] / 1e9, end["sum_received"]["bytes"], per_stream


def relay_cpu_seconds(chain):
    """User+system CPU of the relays, their live children and the children they have reaped (socat
    forks one per connection)."""
    return chain.sum_over_processes(lambda pid: sum(map(int, stat_fields(pid)[11:15]))) / os.sysconf("SC_CLK_TCK")


def rtt(port, count=10000, chain=None):
    """64-byte round trips, back to back: (p50 µs, p99 µs, the relays' CPU µs per round trip or None)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    message, times, cpu0 = b"x" * 64, [], None
    for i in range(count + 1):  # the first is not counted: after it every relay process (socat's children) exists
        if i == 1 and chain and chain.procs:
            cpu0 = relay_cpu_seconds(chain)
        start = time.perf_counter()
        sock.sendall(message)
        got = 0
        while got < 64:
            got += len(sock.recv(64 - got))
        times.append(time.perf_counter() - start)
    cpu = (relay_cpu_seconds(chain) - cpu0) / count * 1e6 if cpu0 is not None else None
    sock.close()
    times = sorted(times[1:])
    return times[len(times) // 2] * 1e6, times[int(len(times) * 0.99)] * 1e6, cpu


def connection_rate(port, seconds, concurrency):
    """Connect, 1-byte round trip, close, as fast as `concurrency` clients can: (completed per
    second, connections that failed: refused, reset or closed without the byte)."""
    done, failed = [0], [0]
    deadline = time.monotonic() + seconds

    def client():
        while time.monotonic() < deadline:
            try:  # a timeout too: a relay that drops a connection without closing it must not hang the run
                sock = gevent.socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.sendall(b"!")
                ok = sock.recv(1) == b"!"
                sock.close()
            except OSError:
                ok = False
            done[0] += ok
            failed[0] += not ok
    start = time.monotonic()
    gevent.joinall([gevent.spawn(client) for _ in range(concurrency)], raise_error=True)
    return done[0] / (time.monotonic() - start), failed[0]


def idle_memory(chain, count=1000):
    """(KiB of PSS, descriptors) the relays hold per idle connection."""
    before, fds_before = chain.pss_kib(), chain.descriptors()
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", chain.port), timeout=30)
        s.sendall(b"k")
        socks.append(s)
    for s in socks:
        assert s.recv(1) == b"k"
    time.sleep(1)
    after, fds_after = chain.pss_kib(), chain.descriptors()
    for s in socks:
        s.close()
    return (after - before) / count, (fds_after - fds_before) / count


def paced_round_trips(port, seconds, gap=0.002):
    """64-byte round trips with `gap` seconds between them, as a person typing or a chatty protocol
    makes them, for `seconds`: (p50, p99, p99.9) in µs."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    message, times = b"i" * 64, []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        start = time.perf_counter()
        sock.sendall(message)
        got = 0
        while got < 64:
            data = sock.recv(64 - got)
            if not data:
                raise RuntimeError("the interactive connection closed")
            got += len(data)
        times.append(time.perf_counter() - start)
        time.sleep(gap)
    sock.close()
    times.sort()
    return tuple(times[min(int(len(times) * q), len(times) - 1)] * 1e6 for q in (0.5, 0.99, 0.999))


def beside_bulk(port, streams, seconds, measure):
    """measure() while iperf3 runs `streams` bulk streams through `port` (another tunnel of the same
    relays): (its result, the bulk Gbit/s reached meanwhile)."""
    bulk = subprocess.Popen(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(int(seconds) + 2), "-J",
                             "-P", str(streams)], stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1)  # past iperf3's start
        result = measure()
        out, _ = bulk.communicate(timeout=seconds * 4 + 60)
    finally:
        bulk.kill()
    report = json.loads(out)
    if "error" in report:
        raise RuntimeError(report["error"])
    return result, report["end"]["sum_received"]["bits_per_second"] / 1e9


def measure_loaded(chain, tools, seconds, postgres):
    """The interactive-under-load table's row for one configuration."""
    row = {}
    echo, bulk = chain.ports[0], chain.ports[1]

    def record(label, figures):
        for name, value in zip(("p50", "p99", "p99.9"), figures, strict=True):
            row[f"rtt {name} µs {label}"] = value
    record("idle", paced_round_trips(echo, seconds))
    for streams in (1, 4, 16):
        figures, gbits = beside_bulk(bulk, streams, seconds, partial(paced_round_trips, echo, seconds))
        record(f"{streams} bulk", figures)
        row[f"bulk Gbit/s meanwhile ({streams})"] = gbits
    if postgres:
        database = chain.ports[2]
        row["pgbench TPS idle"] = postgres.tps(database, seconds)
        row["pgbench TPS 4 bulk"], row["bulk Gbit/s meanwhile (pgbench)"] = beside_bulk(
            bulk, 4, seconds, partial(postgres.tps, database, seconds))
    return row


# ------------------------------------------------------------------ the run

def measure(chain, tools, seconds, clients, idle):
    # A chain that fails this is still measured: its row says so, and the figures stand beside it.
    row = {"intact": integrity(chain.port)}
    row["rtt p50 µs"], row["rtt p99 µs"], cpu = rtt(chain.port, chain=chain)
    if cpu is not None:
        row["relay CPU µs per round trip"] = cpu
    row["conn/s sequential"], failed = connection_rate(chain.port, seconds / 2, 1)
    row[f"conn/s {clients} clients"], failed_many = connection_rate(chain.port, seconds / 2, clients)
    row["failed connections"] = float(failed + failed_many)
    if chain.procs:
        row["KiB per idle conn"], row["descriptors per idle conn"] = idle_memory(chain, idle)
    return row


def measure_iperf(chain, tools, seconds):
    row = {}
    if not tools["iperf3"]:
        return row
    port = chain.ports[1]
    cpu0, machine0 = chain.cpu_seconds() if chain.procs else 0, machine_busy_seconds()
    row["up Gbit/s"], up_bytes, _ = iperf(port, seconds)
    row["down Gbit/s"], down_bytes, _ = iperf(port, seconds, reverse=True)
    gib = (up_bytes + down_bytes) / 2**30
    # The machine's figure is the one to compare: the kernel's softirq work for a relay's sockets is
    # charged to no process, and splicing moves work there.
    row["machine CPU s per GiB"] = (machine_busy_seconds() - machine0) / gib
    if chain.procs:
        row["relay CPU s per GiB"] = (chain.cpu_seconds() - cpu0) / gib
    total, _, streams = iperf(port, seconds, streams=100)
    row["100 streams Gbit/s"] = total
    row["slowest/mean stream"] = min(streams) / statistics.mean(streams)
    return row


def median_row(rows):
    """Each figure's median over the rounds; a word ("yes") as it was, or how often each one came."""
    merged = {}
    for metric in rows[0]:
        values = [row[metric] for row in rows if metric in row]
        if isinstance(values[0], float):
            merged[metric] = statistics.median(values)
        elif len(set(values)) == 1:
            merged[metric] = values[0]
        else:
            merged[metric] = ", ".join(f"{word} in {values.count(word)} of {len(values)}"
                                       for word in sorted(set(values)))
    return merged


def table(results, base):
    metrics = []
    for row in results.values():
        metrics += [m for m in row if m not in metrics]
    better_low = {"KiB per idle conn", "descriptors per idle conn", "machine CPU s per GiB", "relay CPU s per GiB",
                  "relay CPU µs per round trip"}
    names = list(results)
    lines = ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for metric in metrics:
        cells = []
        for name in names:
            value = results[name].get(metric)
            if value is None:
                cells.append("–")
                continue
            if isinstance(value, str):
                cells.append(value)
                continue
            text = f"{value:.3g}" if value < 1000 else f"{value:,.0f}"
            ratios = []
            for ref in (base, "direct"):
                reference = results.get(ref, {}).get(metric)
                if ref != name and isinstance(reference, float) and reference:
                    ratios.append(f"{value / reference:.2f}× {'socat' if ref == base else 'direct'}")
            cells.append(text + (f" ({', '.join(ratios)})" if ratios else ""))
        lower = " (lower is better)" if metric in better_low or "µs" in metric else ""
        lines.append(f"| {metric}{lower} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_round(upstreams, name, measure):
    """One configuration's row of one table in one round, or None if it failed (said on stderr)."""
    try:
        chain = upstreams.chain(name)
    except (OSError, RuntimeError) as exc:
        print(f"bench: {name}: did not start: {exc}", file=sys.stderr, flush=True)
        return None
    try:
        row = measure(chain)
        print(f"bench: {name}: {json.dumps(row)}", file=sys.stderr, flush=True)  # kept if a later one hangs
        return row
    except (OSError, RuntimeError, AssertionError, subprocess.TimeoutExpired) as exc:
        # One relay that hangs or breaks costs its own row in this round, not the run.
        print(f"bench: {name}: round failed: {exc!r}", file=sys.stderr, flush=True)
        return None
    finally:
        chain.stop()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the tables as Markdown to this file")
    parser.add_argument("--seconds", type=float, default=4, help="length of each timed run")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--rounds", type=int, default=1, help="repeat everything; report each figure's median")
    parser.add_argument("--base", default=BASE, help="the configuration the ratios compare with")
    parser.add_argument("--clients", type=int, default=50, help="clients at once for the second conn/s figure")
    parser.add_argument("--idle", type=int, default=1000, help="idle connections held to price one")
    parser.add_argument("--tables", default="main,loaded",
                        help="main (throughput, round trips, connections, memory), loaded (interactive "
                             "round trips and pgbench beside bulk streams), or both")
    args = parser.parse_args()
    tables = args.tables.split(",")
    tools = ensure_tools(postgres="loaded" in tables)
    for tool, present in tools.items():
        if not present:
            print(f"bench: {tool} is missing: its rows are skipped", file=sys.stderr)
    if "loaded" in tables and not tools["iperf3"]:
        tables.remove("loaded")
    names = [name for name in args.configs.split(",") if tools["socat"] or not name.startswith("socat")]
    measures = {
        "main": lambda chain: {**measure(chain, tools, args.seconds, args.clients, args.idle),
                               **measure_iperf(chain, tools, args.seconds)},
        "loaded": lambda chain: measure_loaded(chain, tools, args.seconds, upstreams.postgres),
    }
    rounds = {(table_name, name): [] for table_name in tables for name in names}
    with Upstreams(iperf=tools["iperf3"], postgres="loaded" in tables and tools.get("pgbench")) as upstreams:
        # Rounds go through every configuration in turn, so that a noisy minute hurts them all alike.
        for number in range(1, args.rounds + 1):
            for table_name in tables:
                for name in names:
                    print(f"bench: round {number}/{args.rounds}: {table_name}: {name}", file=sys.stderr)
                    row = run_round(upstreams, name, measures[table_name])
                    if row:
                        rounds[table_name, name].append(row)
    machine = f"{os.cpu_count()} cores, {os.uname().release}, Python {sys.version.split()[0]}"
    median = f", the median of {args.rounds} rounds" if args.rounds > 1 else ""
    guest = (" inside the QEMU guest of test/vsockvm.sh (emulated: only the ratios within this run count)"
             if in_vsock_guest() else "")
    report = f"vtunnel benchmark on {machine}{guest}{median}\n"
    titles = {"main": "", "loaded": "Interactive under load: 64-byte round trips 2 ms apart through one tunnel, "
                                     "idle and beside N iperf3 streams through another; pgbench -S, 8 clients\n\n"}
    for table_name in tables:
        results = {name: median_row(rows) for (t, name), rows in rounds.items() if t == table_name and rows}
        report += f"\n{titles[table_name]}{table(results, args.base)}\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
