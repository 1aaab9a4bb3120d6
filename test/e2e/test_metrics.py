"""--metrics: /metrics in the Prometheus text format (parsed with prometheus_client's own parser) and
/status as JSON, scraped from a real process during a transfer: the byte counters grow as bytes move."""

import json
import socket
import threading
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from helpers import Vtunnel, free_port, read_all, socket_dir, source_server, tunnel_entry, wait_until, write_config


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
