"""An error nobody expected (a bug, an OS error no code path foresaw), put in on purpose by
test/e2e/inject.py into a real `vtunnel local` process.

A tunnel's own loop or accept loop that dies must not leave a process that still looks healthy: it
logs the traceback once at ERROR and exits 1, so a service manager restarts it. A bug met while
carrying one connection fails that connection as a failure (a reset at the client), with the
traceback, and the process serves on.
"""

import contextlib
import os
import socket

import pytest

from helpers import ROOT, Vtunnel, echo_works, tunnel_entry, wait_until, write_config

INJECT = str(ROOT / "test/e2e/inject.py")


def local_with(fault, tmp_path, upstream):
    tunnels = [tunnel_entry("doomed", upstream.port), tunnel_entry("healthy", upstream.port)]
    config = write_config(tmp_path, tunnels)
    vtunnel = Vtunnel("local", "--config-path", config, log_dir=tmp_path, launcher=(INJECT, fault))
    return vtunnel, {t["name"]: t["peer-port"] for t in tunnels}


@pytest.mark.parametrize("fault,where", [("tunnel_loop", "serve_tunnel"), ("accept", "doomed: accepting")])
def test_a_tunnel_that_dies_of_a_bug_stops_the_process_with_its_traceback(fault, where, tmp_path, echo):
    vtunnel, ports = local_with(fault, tmp_path, echo)
    try:
        vtunnel.wait_for_log("healthy: listening on 127.0.0.1")
        if fault == "accept":  # the first client meets the bug (and may be reset as the process stops)
            with contextlib.suppress(ConnectionResetError), socket.create_connection(("127.0.0.1", ports["doomed"])):
                pass
        wait_until(lambda: not vtunnel.alive(), timeout=30, what="the process to stop")
    finally:
        code = vtunnel.stop()
    log = vtunnel.log
    assert code == 1, log
    assert f"ERROR unexpected error in {where}; stopping\nTraceback" in log
    assert log.count("Traceback") == 1 and "RuntimeError: injected" in log
    assert log.rstrip().endswith(f"ERROR stopped after an unexpected error in {where} (its traceback is above)")


@pytest.mark.parametrize("fault,cause", [("pump", "injected: a bug in the pump"),
                                         ("relay", "injected: a bug before the pump")])
def test_a_bug_while_carrying_fails_that_connection_and_the_process_serves_on(fault, cause, tmp_path, echo):
    vtunnel, ports = local_with(fault, tmp_path, echo)
    try:
        vtunnel.wait_for_log("healthy: listening on 127.0.0.1")
        vtunnel.wait_for_log("healthy: listening on tcp:")  # the host end too: else the client meets "host unreachable"
        with pytest.raises(ConnectionResetError):  # the reset may come before connect() has returned, or after
            with socket.create_connection(("127.0.0.1", ports["healthy"]), timeout=20) as sock:
                sock.sendall(b"boom" + os.urandom(1000))
                while sock.recv(65536):
                    pass
        if fault == "pump":
            vtunnel.wait_for_log(f"failed (vtunnel: {cause})")
            assert "ERROR unexpected error carrying bytes: ending this connection in failure\nTraceback" in vtunnel.log
        else:
            vtunnel.wait_for_log(f"TypeError: {cause}")
            assert "ERROR healthy #1: unexpected error: ending this connection in failure\nTraceback" in vtunnel.log
        assert echo_works(ports["healthy"], 100_000) and vtunnel.alive()
    finally:
        vtunnel.stop()
