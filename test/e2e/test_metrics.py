"""--metrics: /metrics in the Prometheus text format (parsed with prometheus_client's own parser) and
/status as JSON, scraped from a real process during a transfer: the byte counters grow as bytes move."""

import json
import socket
import threading
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from helpers import (
    Vtunnel,
    echo_works,
    exchange,
    free_port,
    read_all,
    run_vtunnel,
    socket_dir,
    source_server,
    tunnel_entry,
    wait_until,
    write_config,
)


def scrape(port, path="/metrics"):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
        return answer.read().decode()


def samples(text):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_and_status_during_a_transfer(tmp_path):
    source = source_server(200 * 1024 * 1024)
    entry = tunnel_entry("dl", source.port)
    metrics = free_port()
    vtunnel = Vtunnel("local", "--config-path", write_config(tmp_path, [entry]), "--metrics", f"127.0.0.1:{metrics}",
                      log_dir=tmp_path)
    try:
        vtunnel.wait_for_log("metrics: serving /metrics and /status on 127.0.0.1:")
        wait_until(lambda: "dl: listening on tcp:" in vtunnel.log, what="the host's listener")
        client = socket.create_connection(("127.0.0.1", entry["peer-port"]), timeout=30)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        first = client.recv(65536)  # the download has begun; the client now reads slowly
        back = ("vtunnel_bytes_total", (("direction", "back"), ("end", "peer"), ("tunnel", "dl")))
        opened = ("vtunnel_connections_open", (("end", "peer"), ("tunnel", "dl")))
        before = samples(scrape(metrics))
        assert before[opened] == 1
        wait_until(lambda: client.recv(1 << 20) and samples(scrape(metrics))[back] > before[back] + (1 << 20),
                   what="the byte counter to grow while the transfer runs")
        status = json.loads(scrape(metrics, "/status"))
        peer = next(t for t in status["tunnels"] if t["end"] == "peer")
        assert peer["tunnel"] == "dl" and peer["open"] == 1 and peer["bytes"]["back"] > 0
        assert status["status"] == "1/1 tunnel(s) connected to the peer"
        threading.Thread(target=read_all, args=(client,), daemon=True).start()
        assert first
    finally:
        vtunnel.stop()
        source.stop()


def test_metrics_on_a_unix_socket_is_private(tmp_path):
    path = f"{socket_dir()}/metrics.sock"
    vtunnel = Vtunnel("local", "--config-path", write_config(tmp_path, [tunnel_entry("a", 1)]),
                      "--metrics", f"unix://{path}", log_dir=tmp_path)
    try:
        vtunnel.wait_for_log(f"metrics: serving /metrics and /status on unix://{path}")
        import os
        import stat
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            answer = read_all(sock).decode()
        assert answer.startswith("HTTP/1.1 200") and "vtunnel_connections_total" in answer
    finally:
        vtunnel.stop()


def test_status_and_reload_commands(tmp_path, echo):
    """`vtunnel status` and `vtunnel reload` against a running process: the table a person reads, a
    reload that cannot start one tunnel (its port is taken), one that fixes it, one with a bad config;
    vtunnel_tunnel_up and vtunnel_reloads_total follow."""
    first = tunnel_entry("first", echo.port)
    config = write_config(tmp_path, [first])
    address = f"127.0.0.1:{free_port()}"
    vtunnel = Vtunnel("local", "--config-path", config, "--metrics", address, log_dir=tmp_path)
    taken = socket.socket()
    try:
        vtunnel.wait_for_log("metrics: serving")
        wait_until(lambda: "first: listening on tcp:" in vtunnel.log, what="the host's listener")
        assert exchange(first["peer-port"], b"x" * 3000) == b"x" * 3000
        code, out, err = run_vtunnel("status", "--metrics", address)
        print(out)
        assert code == 0 and out.startswith("1/1 tunnel(s) connected to the peer; reloads: 0 ok, 0 invalid, 0 failed")
        rows = {tuple(line.split()[:2]): line.split() for line in out.splitlines() if line.startswith("first ")}
        assert rows[("first", "peer")][2:9] == ["yes", "0", "1", "2.9", "KiB", "2.9", "KiB"]
        assert rows[("first", "host")][2] == "yes"

        second = tunnel_entry("second", echo.port)
        taken.bind(("127.0.0.1", second["peer-port"]))
        taken.listen()
        write_config(tmp_path, [first, second])
        code, out, err = run_vtunnel("reload", "--metrics", address)
        assert code == 1 and "second could not start" in err
        status = json.loads(scrape(address.split(":")[1], "/status"))
        peer = {t["tunnel"]: t for t in status["tunnels"] if t["end"] == "peer"}
        assert peer["second"]["up"] is False and "cannot listen on 127.0.0.1:" in peer["second"]["last_error"]
        assert peer["first"]["up"] is True and echo_works(first["peer-port"])
        metrics = samples(scrape(address.split(":")[1]))
        assert metrics[("vtunnel_tunnel_up", (("end", "peer"), ("tunnel", "second")))] == 0
        assert metrics[("vtunnel_reloads_total", (("result", "failed"),))] == 1

        taken.close()
        code, out, err = run_vtunnel("reload", "--metrics", address)
        assert (code, out.strip()) == (0, "reloaded: 0 added, 1 changed (second), 0 removed, 1 kept")
        assert wait_until(lambda: echo_works(second["peer-port"]), what="the second tunnel")
        metrics = samples(scrape(address.split(":")[1]))
        assert metrics[("vtunnel_tunnel_up", (("end", "peer"), ("tunnel", "second")))] == 1

        config.write_text("tunnel:\n- name: first\n")
        code, out, err = run_vtunnel("reload", "--metrics", address)
        assert code == 2 and "config.yaml:2: tunnel 'first': missing key 'handshake-port'" in err
        assert "nothing changed" in err
        metrics = samples(scrape(address.split(":")[1]))
        assert [metrics[("vtunnel_reloads_total", (("result", r),))] for r in ("ok", "invalid", "failed")] == [1, 1, 1]
        assert echo_works(first["peer-port"]) and echo_works(second["peer-port"])
    finally:
        taken.close()
        vtunnel.stop()


def test_reload_wants_a_post_with_its_header(tmp_path):
    address = f"127.0.0.1:{free_port()}"
    vtunnel = Vtunnel("local", "--config-path", write_config(tmp_path, [tunnel_entry("a", 1)]), "--metrics",
                      address, log_dir=tmp_path)
    try:
        vtunnel.wait_for_log("metrics: serving")
        for method, headers in (("GET", {}), ("POST", {})):  # what a browser's page may send unasked
            request = urllib.request.Request(f"http://{address}/reload", method=method, headers=headers)
            try:
                urllib.request.urlopen(request, timeout=10)
                raise AssertionError("answered")
            except urllib.error.HTTPError as exc:
                assert exc.code == 405
        assert "reload" not in vtunnel.log
    finally:
        vtunnel.stop()
