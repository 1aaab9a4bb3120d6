"""Reload on SIGHUP: tunnels added, removed, changed and kept while checksummed transfers run through
them, at both ends, over every transport; a config with problems changes nothing."""

import re
import signal
import threading

import pytest
from test_failure_matrix import VSOCK_GUEST

from helpers import (
    MODES,
    SlowTransfer,
    echo_works,
    exchange,
    free_port,
    listening,
    source_server,
    stream_bytes,
    wait_until,
)

MiB = 1024 * 1024


def reload(d):
    """SIGHUP to every process of the deployment; returns each one's summary line once logged."""
    before = {p: len(p.log) for p in d.processes()}
    for p in d.processes():
        p.process.send_signal(signal.SIGHUP)
    lines = {}
    for p in d.processes():
        p.wait_for_log("reload: ")
        wait_until(lambda p=p: re.search(r"reload: (\d+ added.*|nothing changed.*)", p.log[before[p]:]),
                   what="the reload's summary line")
        lines[p.args[0]] = re.search(r"reload: (\d+ added.*|nothing changed.*)", p.log[before[p]:])[0]
    return lines


ALL_TRANSPORTS = [*MODES, pytest.param("vsock", marks=[pytest.mark.vsock, VSOCK_GUEST])]


@pytest.mark.parametrize("mode", ALL_TRANSPORTS)
def test_a_reload_adds_removes_changes_and_keeps_tunnels_while_transfers_run(deployment, echo, mode):
    download = source_server(100_000)
    d = deployment(mode)
    keep = d.add_tunnel("keep", echo.port)
    gone = d.add_tunnel("gone", echo.port)
    moved = d.add_tunnel("moved", echo.port)  # after the reload, the peer listens on another port
    rerouted = d.add_tunnel("rerouted", echo.port)  # after the reload, the host dials another upstream
    d.start()
    d.wait_ready()
    resume, never = threading.Event(), threading.Event()
    kept = [SlowTransfer(keep["peer-port"], 16 * MiB, resume) for _ in range(4)]
    others = [SlowTransfer(entry["peer-port"], 4 * MiB, resume) for entry in (moved, rerouted)]
    # The removed tunnel's transfer is small, to finish well inside --grace 2 even in the emulated vsock
    # guest: cut after its client half-closed, it could not be told from a clean end over vsock or unix:.
    others.append(SlowTransfer(gone["peer-port"], MiB // 4, resume))
    stuck = SlowTransfer(gone["peer-port"], 1 * MiB, never)  # outlives the removed tunnel's grace
    for transfer in kept + others + [stuck]:
        assert transfer.halfway.wait(60), "every transfer is under way before the reload"

    old_moved_port, moved["peer-port"] = moved["peer-port"], free_port()
    rerouted["upstream-server-address"] = f"127.0.0.1:{download.port}"
    d.tunnels.remove(gone)
    added = d.add_tunnel("added", echo.port)  # and writes the new config
    lines = reload(d)
    resume.set()

    for transfer in kept + others:
        transfer.join(60)
        assert transfer.ended.wait(60)
        assert transfer.intact(), f"a transfer across the reload lost or changed bytes: {transfer.failure}"
    assert stuck.ended.wait(30) and isinstance(stuck.failure, ConnectionResetError), \
        "the removed tunnel's connection that outlived --grace ends in a reset"
    assert echo_works(keep["peer-port"], 100_000)
    assert wait_until(lambda: echo_works(moved["peer-port"]), what="the moved tunnel on its new port")
    assert not listening(old_moved_port) and not listening(gone["peer-port"])
    assert wait_until(lambda: echo_works(added["peer-port"]), what="the added tunnel")
    assert exchange(rerouted["peer-port"], b"") == b"".join(stream_bytes(100_000))
    if mode == "local":
        assert lines["local"] == "reload: 1 added (added), 2 changed (moved, rerouted), 1 removed (gone), 1 kept"
    else:  # each end replaces only the tunnels whose keys it uses changed
        assert lines["peer"] == "reload: 1 added (added), 1 changed (moved), 1 removed (gone), 2 kept"
        assert lines["host"] == "reload: 1 added (added), 1 changed (rerouted), 1 removed (gone), 2 kept"
    for p in d.processes():
        assert not re.search(r"keep #\d+ failed", p.log), "no connection of the kept tunnel failed"
        ends = 2 if mode == "local" else 1
        assert p.log.count("keep: listening on") == ends, "nor was it reopened"
    download.stop()


def test_a_config_with_problems_changes_nothing(deployment, echo):
    d = deployment("tcp")
    keep = d.add_tunnel("keep", echo.port)
    d.start()
    d.wait_ready()
    resume = threading.Event()
    transfer = SlowTransfer(keep["peer-port"], 8 * MiB, resume)
    assert transfer.halfway.wait(60)
    good = d.config.read_text()
    # Three problems: a vsock port two tunnels claim, a key nobody knows, a port that cannot be.
    def entry(name, handshake_port, peer_port, extra=""):
        return (f"- name: {name}\n  handshake-port: {handshake_port}\n  vsock-host-port: {free_port()}\n"
                f"  peer-address: 127.0.0.1\n  peer-port: {peer_port}\n  upstream-server-address: 127.0.0.1:1\n"
                + extra)
    d.config.write_text(good + entry("twin", keep["handshake-port"], free_port())
                        + entry("odd", free_port(), 70000, "  colour: blue\n"))
    lines = reload(d)
    resume.set()
    transfer.join(60)
    assert transfer.ended.wait(60) and transfer.intact()
    for p in d.processes():
        assert lines[p.args[0]] == "reload: nothing changed: the 1 tunnel(s) serving go on as before"
        assert re.search(r"ERROR reload: .*config.yaml:\d+: tunnel 'twin': handshake-port \d+ is already used", p.log)
        assert re.search(r"ERROR reload: .*config.yaml:\d+: tunnel 'odd': unknown key 'colour'", p.log)
        assert re.search(r"ERROR reload: .*config.yaml:\d+: tunnel 'odd': key 'peer-port': ", p.log)
        assert p.alive()
    assert echo_works(keep["peer-port"], 100_000)
