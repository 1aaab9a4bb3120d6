"""What an outsider (or a stuck dependency) could do to a running vtunnel, each found in review: a
Unix-socket upstream that stops accepting, a socket file held by a live process that never accepts,
the metrics endpoint held, rebound or asked by a stranger, a reload that could not start a tunnel."""

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

import vtunnel
from helpers import (
    ROOT,
    Vtunnel,
    echo_works,
    free_port,
    run_vtunnel,
    socket_dir,
    tunnel_entry,
    wait_until,
    write_config,
)


def full_unix_listener():
    """A Unix socket that listens and never accepts, its queue filled: a stuck docker.sock."""
    path = os.path.join(socket_dir(), "stuck.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(0)
    queued = []
    for _ in range(64):  # bounded: the queue fills after a few
        client = socket.socket(socket.AF_UNIX)
        client.setblocking(False)
        try:
            client.connect(path)
        except BlockingIOError:
            client.close()
            break
        queued.append(client)
    return path, [listener, *queued]


def test_dialling_a_unix_socket_whose_queue_is_full_waits_without_spinning():
    path, held = full_unix_listener()
    try:
        cpu = time.process_time()
        with pytest.raises(socket.timeout):
            vtunnel.connect_unix(path, timeout=1.5)
        assert time.process_time() - cpu < 0.5  # the old connect spun: 1.5 s of CPU in 1.5 s
    finally:
        for sock in held:
            sock.close()


def test_a_live_socket_that_never_accepts_is_refused_not_waited_on():
    """Claiming a socket path probes it through the loop with a deadline: the old blocking probe hung."""
    path, held = full_unix_listener()
    try:
        done = subprocess.run([sys.executable, "-c", f"import vtunnel; vtunnel.listen_unix({path!r})"],
                              capture_output=True, text=True, timeout=20, cwd=ROOT)
        assert done.returncode == 1 and "another process listens on this socket" in done.stderr
        assert os.path.exists(path)  # not removed: it is someone's
    finally:
        for sock in held:
            sock.close()


def request(address, path, method="GET", host=None, headers=None):
    """(HTTP status, body) from the metrics endpoint, with the Host header a browser would send."""
    headers = dict(headers or {})
    if host:
        headers["Host"] = host
    req = urllib.request.Request(f"http://{address}{path}", method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=20) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def metrics_vtunnel(tmp_path, echo):
    entry = tunnel_entry("m", echo.port)
    address = f"127.0.0.1:{free_port()}"
    config = write_config(tmp_path, [entry])
    process = Vtunnel("local", "--config-path", config, "--metrics", address, "--grace", "30", log_dir=tmp_path)
    process.wait_for_log("metrics: serving")
    wait_until(lambda: "m: listening on tcp:" in process.log, what="the host's listener")
    yield process, address, entry, config
    process.stop()


def test_silent_connections_do_not_hold_the_metrics_endpoint(metrics_vtunnel):
    process, address, _, _ = metrics_vtunnel
    host, port = address.split(":")
    silent = [socket.create_connection((host, int(port)), timeout=60) for _ in range(24)]  # the old slots: 16
    try:
        assert request(address, "/status")[0] == 200
        silent[0].settimeout(60)
        assert silent[0].recv(1) == b""  # dropped after METRICS_TIMEOUT, not held for ever
    finally:
        for sock in silent:
            sock.close()


def test_a_rebound_name_in_host_is_refused(metrics_vtunnel):
    """DNS rebinding: a page whose name now points at 127.0.0.1 sends its own name in Host."""
    process, address, _, _ = metrics_vtunnel
    for path, method, headers in (("/status", "GET", {}), ("/reload", "POST", {"X-Vtunnel": "reload"})):
        status, body = request(address, path, method, host="attacker.example", headers=headers)
        assert status == 403 and b"tunnels" not in body
    assert "reloading" not in process.log
    assert request(address, "/status", host=f"localhost:{address.split(':')[1]}")[0] == 200
    assert request(address, "/status", host=address)[0] == 200


def test_status_gives_up_on_a_server_that_never_answers():
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    try:
        address = "127.0.0.1:%d" % silent.getsockname()[1]
        code, out, err = run_vtunnel("status", "--metrics", address, timeout=90)  # the old one waited for ever
        assert code == 1 and "timed out" in err and "Traceback" not in err
    finally:
        silent.close()


@pytest.mark.parametrize("command", [["status"], ["peer", "--config-path", "config.yaml"]])
@pytest.mark.parametrize("address", ["localhost", "http://127.0.0.1:9100", "npipe:////./pipe/metrics"])
def test_a_bad_metrics_address_is_one_line_and_exit_2(command, address):
    code, out, err = run_vtunnel(*command, "--metrics", address)
    assert code == 2 and "Traceback" not in err
    assert err.startswith(f"vtunnel: --metrics {address}: expected") and len(err.strip().splitlines()) == 1


def test_a_reload_whose_host_side_cannot_listen_is_reported_failed(metrics_vtunnel, echo):
    """The host listens only after its handshake, in the background: reload waits for the outcome."""
    process, address, first, config = metrics_vtunnel
    second = tunnel_entry("second", echo.port)
    taken = socket.socket()
    taken.bind(("127.0.0.1", second["vsock-host-port"]))  # where the local host listens for the second's legs
    taken.listen()
    try:
        write_config(config.parent, [first, second])
        code, out, err = run_vtunnel("reload", "--metrics", address)
        assert code == 1 and "second could not start" in err, (code, out, err)
        assert echo_works(first["peer-port"])
    finally:
        taken.close()


def test_a_keep_alive_metrics_connection_does_not_hold_a_stop(metrics_vtunnel):
    process, address, _, _ = metrics_vtunnel
    host, port = address.split(":")
    scraper = socket.create_connection((host, int(port)), timeout=10)
    scraper.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")  # keep-alive, as Prometheus keeps it
    assert scraper.recv(12).startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    process.stop(timeout=60)
    assert time.monotonic() - started < 15  # --grace 30: the scraper's connection did not wait it out
    scraper.close()


def test_a_tunnel_flipped_to_reverse_by_a_reload_counts_and_logs_under_its_new_names(metrics_vtunnel, echo):
    """Forward, the peer's far end is the host; reverse, it is the VM's upstream: the counters and
    the log lines must say which, not keep the old direction's names."""
    process, address, first, config = metrics_vtunnel
    flipped = {"name": "m", "handshake-port": free_port(), "vsock-peer-port": free_port(),
               "host-listen-address": f"127.0.0.1:{free_port()}", "upstream-server-address": "127.0.0.1:1"}
    write_config(config.parent, [flipped])
    code, out, err = run_vtunnel("reload", "--metrics", address)
    assert code == 0, (out, err)
    host_port = int(flipped["host-listen-address"].rsplit(":", 1)[1])
    wait_until(lambda: not echo_works(host_port), what="a client reset: nothing listens on port 1 in the 'VM'")
    wait_until(lambda: "upstream unreachable" in process.log, what="the peer's line naming the VM's upstream")
    metrics = request(address, "/metrics")[1].decode()
    peer_lines = [line for line in metrics.splitlines() if 'end="peer"' in line and 'tunnel="m"' in line
                  and line.startswith("vtunnel_bytes_total")]
    assert peer_lines and not any('"to host"' in line for line in peer_lines), peer_lines
