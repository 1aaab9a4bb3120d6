"""vtunnel_metrics: the --metrics endpoint, an HTTP application on gevent's pywsgi.

GET /metrics (the Prometheus text format, written by prometheus_client) and /status (JSON), and POST
/reload, from the counters and states of a running vtunnel's Service, which it reads and asks to reload
(service.runs, .reloads, .status(), .reload(), .config_path; each run's tunnel, end, up, state, stats
and mirror_status()). vtunnel.py opens the listener and serves this on it; this module imports nothing
of vtunnel.
"""

import ipaddress
import json
import logging
import re

import gevent.pywsgi

log = logging.getLogger("vtunnel")
METRICS_TIMEOUT = 10.0  # seconds a metrics connection may be silent before it is dropped


class MetricsServer(gevent.pywsgi.WSGIServer):
    """pywsgi with a deadline on every connection: a client that connects and sends nothing (or
    too slowly) is dropped after METRICS_TIMEOUT, so no one holds the endpoint's slots by waiting."""

    def handle(self, sock, address):
        sock.settimeout(METRICS_TIMEOUT)
        super().handle(sock, address)


def trusted_host(header):
    """Whether a request's Host header may reach the metrics endpoint: none, localhost, or an IP literal.

    A web page that rebinds its own DNS name to 127.0.0.1 becomes same-origin with this endpoint, but
    its requests still carry its name in Host: refused here, so it can neither read /status nor reload.
    """
    if not header:
        return True
    bracketed = re.fullmatch(r"\[([^\]]+)\](:\d+)?", header)  # [IPv6] or [IPv6]:port
    host = bracketed.group(1) if bracketed else header.partition(":")[0]
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host.lower() == "localhost"
    return True


class MetricsApp:
    """The WSGI application behind --metrics: GET /metrics and /status, POST /reload."""

    def __init__(self, service):
        import prometheus_client.core
        import prometheus_client.exposition
        self.service = service
        self.registry = prometheus_client.core.CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self.exposition = prometheus_client.exposition

    def __call__(self, environ, start_response):
        path, method = environ.get("PATH_INFO", ""), environ.get("REQUEST_METHOD", "GET")
        if not trusted_host(environ.get("HTTP_HOST")):
            return answer(start_response, "403 Forbidden", b"Host must be localhost or an IP address\n")
        if path == "/reload":
            return self.reload(environ, start_response)
        if path == "/metrics":
            body, kind = self.exposition.generate_latest(self.registry), self.exposition.CONTENT_TYPE_LATEST
        elif path == "/status":
            body, kind = json_body(self.status())
        else:
            return answer(start_response, "404 Not Found", b"try /metrics, /status or POST /reload\n")
        if method not in ("GET", "HEAD"):
            return answer(start_response, "405 Method Not Allowed", b"GET only\n")
        return answer(start_response, "200 OK", body, kind)

    def reload(self, environ, start_response):
        # A header no HTML form can send: a web page the user visits cannot make a browser post
        # to this loopback port without a CORS preflight, which nothing here answers.
        if environ.get("REQUEST_METHOD") != "POST" or environ.get("HTTP_X_VTUNNEL") != "reload":
            return answer(start_response, "405 Method Not Allowed", b"POST with the header X-Vtunnel: reload\n")
        log.info("POST /reload: reloading %s", self.service.config_path)
        outcome = self.service.reload()
        status = "200 OK" if outcome["result"] in ("ok", "pending") else "409 Conflict"
        return answer(start_response, status, *json_body(outcome))

    def collect(self):
        """prometheus_client's collector protocol: one family per counter, a sample per tunnel and end."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        labels = ["tunnel", "end"]
        up = GaugeMetricFamily("vtunnel_tunnel_up", "1 when the tunnel listens (and, on the host, its peer "
                               "answered the last handshake)", labels=labels)
        open_ = GaugeMetricFamily("vtunnel_connections_open", "Connections open now", labels=labels)
        total = CounterMetricFamily("vtunnel_connections", "Connections carried", labels=labels)
        moved = CounterMetricFamily("vtunnel_bytes", "Bytes carried, counted as they move",
                                    labels=labels + ["direction"])
        failures = CounterMetricFamily("vtunnel_failures", "Connections that failed", labels=labels + ["cause"])
        refused = CounterMetricFamily("vtunnel_refused", "Tunnel legs refused before anything was dialled "
                                      "(a foreign CID, the leg exchange failed)", labels=labels + ["reason"])
        reloads = CounterMetricFamily("vtunnel_reloads", "Reloads of the config, by result", labels=["result"])
        for run in self.service.runs.values():
            stats, ids = run.stats, [run.tunnel.name, run.end]
            up.add_metric(ids, int(run.up))
            open_.add_metric(ids, stats.open)
            total.add_metric(ids, stats.total)
            sent = stats.sent
            moved.add_metric(ids + [f"to {stats.far_name}"], sent[0])
            moved.add_metric(ids + ["back"], sent[1])
            for cause, count in stats.failures.items():
                failures.add_metric(ids + [cause], count)
            for reason, count in stats.refused.items():
                refused.add_metric(ids + [reason], count)
        for result, count in self.service.reloads.items():
            reloads.add_metric([result], count)
        mirrored = GaugeMetricFamily("vtunnel_mirrored_ports", "VM ports a mirror carries now (the host: those it "
                                     "listens on; the peer: those it reports)", labels=labels)
        for run in self.service.runs.values():
            if run.tunnel.mirror:
                mirrored.add_metric([run.tunnel.name, run.end], len(run.mirrored))
        return [up, open_, total, moved, failures, refused, reloads, mirrored]

    def status(self):
        return {"status": self.service.status(), "reloads": dict(self.service.reloads),
                "tunnels": [self.tunnel_status(run) for run in self.service.runs.values()]}

    @staticmethod
    def tunnel_status(run):
        stats, sent = run.stats, run.stats.sent  # summed over the open connections: once
        return {"tunnel": run.tunnel.name, "end": run.end, "up": run.up, "state": run.state,
                "open": stats.open, "total": stats.total,
                "bytes": {f"to {stats.far_name}": sent[0], "back": sent[1]}, "failures": dict(stats.failures),
                "refused": dict(stats.refused), "leg_secret": bool(run.tunnel.leg_secret),
                "last_error": stats.last_error, **run.mirror_status()}


def json_body(value):
    return json.dumps(value, indent=1).encode() + b"\n", "application/json"


def answer(start_response, status, body, kind="text/plain"):
    start_response(status, [("Content-Type", kind), ("Content-Length", str(len(body)))])
    return [body]
