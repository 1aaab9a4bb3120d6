"""What --log-level warning keeps: every failed connection and the counters at exit, and nothing of a
connection that closed cleanly (issue 28)."""

import re
import socket
import threading

from helpers import Vtunnel, echo_server, echo_works, how_it_ended, reset, tunnel_entry, wait_until, write_config


def resetting_upstream():
    """An upstream that answers 100 bytes and then resets: a failure in the middle of a reply."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conn.recv(100)
            conn.sendall(b"x" * 100)
            reset(conn)
    threading.Thread(target=serve, daemon=True).start()
    return listener


def _reaches_the_upstream(port, vtunnel):
    """One request through the failing tunnel; whether a connection has failed at the upstream yet."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"request")
            how_it_ended(sock)
    except OSError:
        pass
    return "failed (upstream: connection reset by peer)" in vtunnel.log


def test_warning_keeps_failed_connections_and_the_totals_and_drops_clean_ones(tmp_path):
    upstream, echo = resetting_upstream(), echo_server()
    failing, clean = tunnel_entry("failing", upstream.getsockname()[1]), tunnel_entry("clean", echo.port)
    vtunnel = Vtunnel("local", "--config-path", write_config(tmp_path, [failing, clean]), "--log-level", "warning",
                      log_dir=tmp_path)
    try:
        # Until its host end has handshaken, a `local` process resets a client (seen once in CI): wait for
        # each tunnel to carry, not just to listen.
        wait_until(lambda: echo_works(clean["peer-port"]), what="the clean tunnel to carry")
        with socket.create_connection(("127.0.0.1", clean["peer-port"]), timeout=30) as sock:
            sock.sendall(b"ping")
            sock.shutdown(socket.SHUT_WR)
            assert how_it_ended(sock) == ("eof", b"ping")
        wait_until(lambda: _reaches_the_upstream(failing["peer-port"], vtunnel), what="the upstream's reset")
        with socket.create_connection(("127.0.0.1", failing["peer-port"]), timeout=30) as sock:
            sock.sendall(b"request")
            assert how_it_ended(sock)[0] == "reset"
    finally:
        vtunnel.stop()
        upstream.close()
        echo.stop()
    log = vtunnel.log
    assert "WARNING failing #" in log and " failed (upstream: connection reset by peer) after " in log
    assert "clean #" not in log  # opened and closed cleanly: nothing at warning
    # the totals at exit (the readiness probes went through the tunnels too: at least 1 each)
    assert re.search(r"WARNING stats failing \(host\): 0 open, [1-9]\d* total, .*failures: upstream", log), log
    assert re.search(r"WARNING stats clean \(peer\): 0 open, [1-9]\d* total, .*failures: none", log), log
