"""vtunnel beside socat and beside direct loopback, in one run, against the same upstreams.

    python test/bench/bench.py [--out FILE.md] [--seconds N] [--rounds N] [--configs A,B,...]

A configuration named "vtunnel=PATH tcp" runs the vtunnel.py at PATH (another checkout) instead of
this one, so a change is measured before and after side by side in one run.

Every configuration first proves it carries bytes intact (SHA-256 both ways), then is measured:
bulk throughput each way and over 100 streams (iperf3), 64-byte round trips, new connections per
second (sequential and 50 at once), memory per idle connection (PSS of the relay processes) and CPU
seconds per GiB moved (the whole machine's, and the relays' own). Needs socat and iperf3: installs
them with apt-get when it can, else skips what needs them and says so.
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
from pathlib import Path

import gevent
import gevent.pool
import gevent.socket

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CONFIGS = ["direct", "socat", "socat -b 262144", "vtunnel tcp", "vtunnel unix", "vtunnel local"]
BASE = "socat -b 262144"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_tools():
    missing = [tool for tool in ("socat", "iperf3") if not shutil.which(tool)]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"bench: installing {' '.join(missing)}", file=sys.stderr)
        subprocess.run("apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "
                       f"--no-install-recommends {' '.join(missing)} >/dev/null", shell=True, check=False)
    return {tool: bool(shutil.which(tool)) for tool in ("socat", "iperf3")}


# ------------------------------------------------------------------ processes

class Chain:
    """One configuration: the processes between a client port and an upstream port."""

    def __init__(self, name, upstreams, tmp):
        """upstreams: the echo port first (it proves readiness), then any others."""
        self.name, self.procs = name, []
        if name == "direct":
            self.ports = list(upstreams)
            return
        self.ports = [free_port() for _ in upstreams]
        if name.startswith("socat"):
            extra = name.split()[1:]
            for port, upstream in zip(self.ports, upstreams, strict=True):
                middle = free_port()
                for listen, target in ((port, middle), (middle, upstream)):
                    self.procs.append(subprocess.Popen(
                        ["socat", *extra, f"TCP-LISTEN:{listen},bind=127.0.0.1,fork,reuseaddr,backlog=4096",
                         f"TCP:127.0.0.1:{target},nodelay"], stderr=subprocess.DEVNULL))
        else:
            config = Path(tmp) / f"config-{len(os.listdir(tmp))}.yaml"
            config.write_text("tunnel:\n" + "".join(
                f"  - name: bench{i}\n    handshake-port: {free_port()}\n    vsock-host-port: {free_port()}\n"
                f"    peer-address: 127.0.0.1\n    peer-port: {port}\n"
                f"    upstream-server-address: 127.0.0.1:{upstream}\n"
                for i, (port, upstream) in enumerate(zip(self.ports, upstreams, strict=True))))
            common = ["--config-path", str(config), "--log-level", "warning"]
            # "vtunnel=PATH tcp" runs another tree's vtunnel.py: a before/after in one run.
            script = name.split()[0].partition("=")[2] or ROOT / "vtunnel.py"
            cmd = [sys.executable, str(script)]
            kind = name.split()[1]
            if kind == "local":
                self.procs.append(subprocess.Popen(cmd + ["local"] + common))
            else:
                transport = "tcp:127.0.0.1" if kind == "tcp" else f"unix:{tempfile.mkdtemp(dir='/tmp')}/v"
                for role in ("peer", "host"):
                    self.procs.append(subprocess.Popen(cmd + [role, "--vsock", transport] + common))
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

    def pss_kib(self):
        total = 0
        for pid in self.pids():
            try:
                text = Path(f"/proc/{pid}/smaps_rollup").read_text()
            except OSError:
                continue
            total += int(text.split("Pss:")[1].split()[0])
        return total

    def stop(self):
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


class Upstreams:
    """The echo server and (with iperf3) the iperf3 server that every configuration leads to."""

    def __init__(self, iperf=True):
        self.tmp = tempfile.mkdtemp(prefix="vtbench")
        self.echo = subprocess.Popen([sys.executable, str(HERE / "upstream.py")], stdout=subprocess.PIPE,
                                     text=True)
        self.echo_port = int(self.echo.stdout.readline())
        self.iperf_port = free_port()
        self.iperf = subprocess.Popen(["iperf3", "-s", "-B", "127.0.0.1", "-p", str(self.iperf_port)],
                                      stdout=subprocess.DEVNULL) if iperf else None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.echo.kill()
        if self.iperf:
            self.iperf.kill()

    def chain(self, name):
        return Chain(name, [self.echo_port, self.iperf_port], self.tmp)


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
    """SHA-256 of 16 MiB each way through the chain (an echo), full duplex."""
    payload = os.urandom(16 * 1024 * 1024)
    sock = gevent.socket.create_connection(("127.0.0.1", port))
    sender = gevent.spawn(lambda: (sock.sendall(payload), sock.shutdown(socket.SHUT_WR)))
    got = hashlib.sha256()
    while data := sock.recv(262144):
        got.update(data)
    sender.get()
    sock.close()
    return got.digest() == hashlib.sha256(payload).digest()


def iperf(port, seconds, reverse=False, streams=1):
    args = ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J", "-P", str(streams)]
    for _ in range(20):  # the server takes one test at a time, and may still be ending the last one
        done = subprocess.run(args + (["-R"] if reverse else []), capture_output=True, text=True)
        result = json.loads(done.stdout)
        if "busy" not in result.get("error", ""):
            break
        time.sleep(0.5)
    if "error" in result:
        raise RuntimeError(result["error"])
    end = result["end"]
    per_stream = [s["receiver"]["bits_per_second"] for s in end["streams"]]
    return end["sum_received"]["bits_per_second"] / 1e9, end["sum_received"]["bytes"], per_stream


def rtt(port, count=10000):
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    message, times = b"x" * 64, []
    for _ in range(count):
        start = time.perf_counter()
        sock.sendall(message)
        got = 0
        while got < 64:
            got += len(sock.recv(64 - got))
        times.append(time.perf_counter() - start)
    sock.close()
    times.sort()
    return times[len(times) // 2] * 1e6, times[int(len(times) * 0.99)] * 1e6


def connection_rate(port, seconds, concurrency):
    """Connect, 1-byte round trip, close, as fast as `concurrency` clients can."""
    done = [0]
    deadline = time.monotonic() + seconds

    def client():
        while time.monotonic() < deadline:
            sock = gevent.socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"!")
            assert sock.recv(1) == b"!"
            sock.close()
            done[0] += 1
    start = time.monotonic()
    gevent.joinall([gevent.spawn(client) for _ in range(concurrency)], raise_error=True)
    return done[0] / (time.monotonic() - start)


def idle_memory(chain, count=1000):
    before = chain.pss_kib()
    socks = []
    for _ in range(count):
        s = socket.create_connection(("127.0.0.1", chain.port))
        s.sendall(b"k")
        socks.append(s)
    for s in socks:
        assert s.recv(1) == b"k"
    time.sleep(1)
    after = chain.pss_kib()
    for s in socks:
        s.close()
    return (after - before) / count


# ------------------------------------------------------------------ the run

def measure(chain, tools, seconds):
    row = {}
    if not integrity(chain.port):
        raise RuntimeError(f"{chain.name}: bytes were corrupted")
    row["intact"] = "yes"
    row["rtt p50 µs"], row["rtt p99 µs"] = rtt(chain.port)
    row["conn/s sequential"] = connection_rate(chain.port, seconds / 2, 1)
    row["conn/s 50 clients"] = connection_rate(chain.port, seconds / 2, 50)
    if chain.procs:
        row["KiB per idle conn"] = idle_memory(chain)
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
    return {metric: statistics.median(row[metric] for row in rows) if isinstance(rows[0][metric], float)
            else rows[0][metric] for metric in rows[0]}


def table(results):
    metrics = []
    for row in results.values():
        metrics += [m for m in row if m not in metrics]
    better_low = {"rtt p50 µs", "rtt p99 µs", "KiB per idle conn", "machine CPU s per GiB",
                  "relay CPU s per GiB"}
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
            for ref in (BASE, "direct"):
                base = results.get(ref, {}).get(metric)
                if ref != name and isinstance(base, float) and base:
                    ratios.append(f"{value / base:.2f}× {'socat' if ref == BASE else 'direct'}")
            cells.append(text + (f" ({', '.join(ratios)})" if ratios else ""))
        lines.append(f"| {metric}{' (lower is better)' if metric in better_low else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the table as Markdown to this file")
    parser.add_argument("--seconds", type=float, default=4, help="length of each timed run")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--rounds", type=int, default=1, help="repeat everything; report each figure's median")
    args = parser.parse_args()
    tools = ensure_tools()
    for tool, present in tools.items():
        if not present:
            print(f"bench: {tool} is missing: its rows are skipped", file=sys.stderr)
    names = [name for name in args.configs.split(",") if tools["socat"] or not name.startswith("socat")]
    rounds = {name: [] for name in names}
    with Upstreams(iperf=tools["iperf3"]) as upstreams:
        # Rounds go through every configuration in turn, so that a noisy minute hurts them all alike.
        for number in range(1, args.rounds + 1):
            for name in names:
                print(f"bench: round {number}/{args.rounds}: {name}", file=sys.stderr)
                chain = upstreams.chain(name)
                try:
                    row = measure(chain, tools, args.seconds)
                    row.update(measure_iperf(chain, tools, args.seconds))
                    rounds[name].append(row)
                finally:
                    chain.stop()
    results = {name: median_row(rows) for name, rows in rounds.items()}
    machine = f"{os.cpu_count()} cores, {os.uname().release}, Python {sys.version.split()[0]}"
    median = f", the median of {args.rounds} rounds" if args.rounds > 1 else ""
    report = f"vtunnel benchmark on {machine}{median}\n\n{table(results)}\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
