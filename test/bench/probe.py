"""Probes behind the benchmark's figures: where the time and the memory go.

    python test/bench/probe.py cpu CONFIG [--seconds N] [--reverse]
        one iperf3 stream through CONFIG: each process's user and system CPU, the machine's
        softirq and idle, and the machine's busy CPU seconds per GiB
    python test/bench/probe.py rtt CONFIG,CONFIG,... [--rounds N]
        64-byte round trips, configurations in turn: p50, p99 and the relays' CPU per round trip
    python test/bench/probe.py conn CONFIG,CONFIG,... [--rounds N] [--seconds N]
        one client opening connections one after another (1-byte round trip, close): connections per
        second and the relays' CPU per connection
    python test/bench/probe.py greenlet
        the memory one greenlet costs while it waits in sock.recv: the floor under every
        idle connection, which holds two per process

CONFIG is one of bench.py's configurations ("socat -b 262144", "vtunnel tcp", ...).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import bench


def ticks(pid):
    """User and system clock ticks of a process."""
    fields = bench.stat_fields(pid)
    return int(fields[11]), int(fields[12])


def probe_cpu(name, seconds, reverse):
    with bench.Upstreams() as upstreams:
        chain = upstreams.chain(name)
        try:
            client = subprocess.Popen(["iperf3", "-c", "127.0.0.1", "-p", str(chain.ports[1]), "-t", str(seconds),
                                       "-J", *(["-R"] if reverse else [])], stdout=subprocess.PIPE, text=True)
            pids = {"iperf3 server": upstreams.iperf.pid, "iperf3 client": client.pid}
            pids.update({f"relay {i}": proc.pid for i, proc in enumerate(chain.procs)})
            time.sleep(1)  # past the start, and measured only while the stream runs
            before, machine_before, start = {k: ticks(p) for k, p in pids.items()}, bench.machine_ticks(), time.time()
            time.sleep(seconds - 2)
            after, machine_after = {k: ticks(p) for k, p in pids.items()}, bench.machine_ticks()
            wall = time.time() - start
            result = json.loads(client.communicate()[0])
        finally:
            chain.stop()
    hz = os.sysconf("SC_CLK_TCK")
    for key in pids:
        user, system = ((after[key][i] - before[key][i]) / hz / wall for i in (0, 1))
        print(f"{key:14} user {user:5.2f}  system {system:5.2f} cores")
    delta = [b - a for a, b in zip(machine_before, machine_after, strict=True)]
    cores = os.cpu_count() / sum(delta)
    print(f"machine        user {delta[0] * cores:5.2f}  system {delta[2] * cores:5.2f}  softirq "
          f"{delta[6] * cores:5.2f}  idle {delta[3] * cores:5.2f} cores")
    gbits = result["end"]["sum_received"]["bits_per_second"] / 1e9
    busy = os.cpu_count() - (delta[3] + delta[4]) * cores
    print(f"{gbits:.2f} Gbit/s; the machine's busy CPU: {busy / (gbits / 8 * 1e9 / 2**30):.3f} s per GiB")


def probe_rtt(names, rounds, count=10000):
    with bench.Upstreams() as upstreams:
        for _ in range(rounds):
            for name in names:
                chain = upstreams.chain(name)
                try:
                    p50, p99, cpu = bench.rtt(chain.port, count, chain=chain)
                finally:
                    chain.stop()
                print(f"{name:18} p50 {p50:5.0f} µs  p99 {p99:5.0f} µs  relay CPU {cpu:5.1f} µs per round trip",
                      flush=True)


def probe_conn(names, rounds, seconds):
    with bench.Upstreams(iperf=False) as upstreams:
        for _ in range(rounds):
            for name in names:
                chain = upstreams.chain(name)
                try:
                    cpu_before = bench.relay_cpu_seconds(chain)
                    rate, failed = bench.connection_rate(chain.port, seconds, 1)
                    cpu = (bench.relay_cpu_seconds(chain) - cpu_before) / (rate * seconds) * 1e6
                finally:
                    chain.stop()
                print(f"{name:18} {rate:6.0f} conn/s ({failed} failed)  relay CPU {cpu:5.0f} µs per connection",
                      flush=True)


def probe_greenlet(count=2000):
    import gevent
    import gevent.socket

    def pss():
        return int(Path("/proc/self/smaps_rollup").read_text().split("Pss:")[1].split()[0])
    pairs = [gevent.socket.socketpair() for _ in range(count)]
    before = pss()
    waiting = [gevent.spawn(a.recv, 1) for a, _ in pairs]
    gevent.sleep(0.5)
    print(f"Python {sys.version.split()[0]}, gevent {gevent.__version__}: one greenlet waiting in sock.recv "
          f"costs {(pss() - before) / count:.2f} KiB")
    gevent.killall(waiting)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("probe", choices=["cpu", "rtt", "conn", "greenlet"])
    parser.add_argument("configs", nargs="?", default="vtunnel tcp")
    parser.add_argument("--seconds", type=float, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reverse", action="store_true")
    args = parser.parse_args()
    if args.probe == "cpu":
        probe_cpu(args.configs, args.seconds, args.reverse)
    elif args.probe == "rtt":
        probe_rtt(args.configs.split(","), args.rounds)
    elif args.probe == "conn":
        probe_conn(args.configs.split(","), args.rounds, args.seconds)
    else:
        probe_greenlet()


if __name__ == "__main__":
    main()
