"""The command line as a user meets it: real processes, exit codes, one-line errors."""

import os
import re
import socket
import subprocess
import sys

import pytest

from helpers import (
    ROOT,
    Vtunnel,
    echo_server,
    free_port,
    run_vtunnel,
    socket_dir,
    tunnel_entry,
    wait_until,
    write_config,
)


def test_version_and_help():
    code, out, _ = run_vtunnel("--version")
    assert code == 0 and out.startswith("vtunnel ")
    code, out, _ = run_vtunnel("--help")
    assert code == 0 and "vtunnel peer" in out and "--vsock TRANSPORT" in out
    assert "tcp:IP, unix:PREFIX or hybrid:PATH" in out  # a host name is refused there: the help says so


def test_check_prints_the_tunnels(tmp_path):
    code, out, err = run_vtunnel("check", "--config-path", ROOT / "config.yaml")
    assert code == 0, err
    assert out.splitlines()[0].split() == ["NAME", "DIRECTION", "HANDSHAKE", "VSOCK", "LISTEN", "UPSTREAM", "LEGS"]
    assert "tcpTunnel" in out and "127.0.0.1:3030" in out


GUID = "3f2504e0-4f89-11d3-9a0c-0305e82c3301"


def test_check_warns_about_what_the_ends_would_refuse_or_warn_about_here(tmp_path):
    piped = tunnel_entry("piped", 1, upstream="npipe:////./pipe/docker_engine")
    exposed = tunnel_entry("exposed", 1)
    exposed["peer-address"] = "0.0.0.0"
    code, out, err = run_vtunnel("check", "--config-path", write_config(tmp_path, [piped, exposed]))
    assert code == 0 and "piped" in out and "exposed" in out
    assert err.splitlines() == [
        "vtunnel: warning: tunnel 'piped': a host here would refuse upstream npipe:////./pipe/docker_engine: "
        f"named-pipe upstreams need Windows; this is {sys.platform}",
        f"vtunnel: warning: tunnel 'exposed': 0.0.0.0:{exposed['peer-port']} is not a loopback address: anyone "
        "who can reach it reaches 127.0.0.1:1 through the host",
    ]


@pytest.mark.parametrize("argv,expected", [
    ([], "bad command line: say what to run: peer, host, local, check, status or reload (vtunnel --help explains"),
    (["peer"], "bad command line: vtunnel peer needs --config-path PATH"),
    (["check"], "bad command line: vtunnel check needs --config-path PATH"),
    (["frob", "--config-path", "x"], "bad command line: unknown command 'frob': expected peer, host, local, check, "
                                     "status or reload"),
    (["status"], "bad command line: vtunnel status needs --metrics ADDRESS, where the running vtunnel serves"),
    (["reload", "--metrics", "npipe:////./pipe/x"], "--metrics npipe:////./pipe/x: expected IP:PORT or unix:///PATH"),
    (["peer", "--config-path", "x", "--vm-id", GUID], "--vm-id names the VM a Hyper-V host serves: it goes with "
                                                       "vtunnel host only"),
    (["host", "--config-path", str(ROOT / "config.yaml"), "--vsock", "tcp:127.0.0.1", "--vm-id", GUID],
     "--vm-id picks a Hyper-V VM: it goes with --vsock hyperv, not tcp:127.0.0.1"),
    (["host", "--config-path", str(ROOT / "config.yaml"), "--vm-id", "xyz"], "--vm-id xyz: expected a VM GUID"),
    (["peer", "--config-path", "x", "--frob"], "bad command line: unexpected or incomplete: --frob"),
    (["local", "--config-path", "x", "--vsock", "tcp:127.0.0.1"], "bad command line: vtunnel local takes no --vsock: "
                                                                  "its two ends always meet over tcp:127.0.0.1"),
    (["check", "--config-path", "/nonexistent.yaml"], "/nonexistent.yaml: cannot read the config: no such file"),
    (["peer", "--config-path", str(ROOT / "config.yaml"), "--vsock", "carrier-pigeon"], "--vsock carrier-pigeon"),
    (["host", "--config-path", str(ROOT / "config.yaml"), "--vsock", "hybrid:"],
     "--vsock hybrid:: expected hybrid:PATH, the VMM's vsock socket (Firecracker's uds_path, Cloud Hypervisor's "
     "--vsock socket=)"),
    (["peer", "--config-path", str(ROOT / "config.yaml"), "--log-level", "loud"], "--log-level loud"),
    (["peer", "--config-path", str(ROOT / "config.yaml"), "--grace", "-1"],
     "--grace -1: expected a number of seconds, 0 or more"),
    (["peer", "--config-path", str(ROOT / "config.yaml"), "--stats-interval", "nan"], "--stats-interval nan"),
])
@pytest.mark.parametrize("optimize", [[], ["-O"]], ids=["", "python -O"])
def test_bad_command_lines_exit_2_without_traceback(argv, expected, optimize):
    code, out, err = run_vtunnel(*argv, python_options=optimize)
    assert code == 2
    assert err.startswith("vtunnel: ") and expected in err.splitlines()[0]
    assert "Traceback" not in err
    if "bad command line" in err:  # then the usage, as --help shows it
        assert err.splitlines()[1:3] == [
            "Usage:", "  vtunnel peer  --config-path PATH [--vsock TRANSPORT] [--metrics ADDRESS] [options]"]


def test_bad_config_lists_every_error_and_exits_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("tunnel:\n  - name: a\n    peer-port: 99999\n    colour: red\n")
    code, out, err = run_vtunnel("check", "--config-path", path)
    assert code == 2 and "Traceback" not in err
    lines = err.splitlines()
    assert f"vtunnel: {path}:3: tunnel 'a': key 'peer-port': expected a TCP port from 1 to 65535, got 99999" in lines
    assert any(line.startswith(f"vtunnel: {path}:4: tunnel 'a': unknown key 'colour': expected one of name, "
                               "handshake-port, vsock-host-port, peer-address, peer-port") for line in lines)
    assert sum("missing key" in line for line in lines) == 4


def test_a_port_in_use_is_one_line_and_exit_1(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        entry = tunnel_entry("t", 1, "unix", peer_port=taken.getsockname()[1])
        config = write_config(tmp_path, [entry])
        sockets = socket_dir()
        code, out, err = run_vtunnel("peer", "--config-path", config, "--vsock", f"unix:{sockets}/v")
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("vtunnel: ")]
    assert errors == [f"vtunnel: tunnel 't': cannot listen on 127.0.0.1:{entry['peer-port']}: address already in use"]
    assert err.splitlines()[-1] == errors[0] and "Traceback" not in err
    assert os.listdir(sockets) == []  # the handshake socket it had opened is gone with it


def test_named_pipe_upstream_on_linux_is_refused_clearly(tmp_path):
    entry = tunnel_entry("pipe", 1, "unix", upstream="npipe:////./pipe/docker_engine")
    config = write_config(tmp_path, [entry])
    code, out, err = run_vtunnel("host", "--config-path", config, "--vsock", f"unix:{socket_dir()}/v")
    assert code == 1
    assert err.strip() == ("vtunnel: tunnel 'pipe': upstream npipe:////./pipe/docker_engine: "
                           "named-pipe upstreams need Windows; this is linux")


def test_python_vtunnel_py_works_like_the_console_script():
    import subprocess
    import sys
    done = subprocess.run([sys.executable, str(ROOT / "vtunnel.py"), "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("vtunnel ")


def test_non_loopback_peer_address_is_warned_about(tmp_path):
    entry = tunnel_entry("open", 1, "unix")
    entry["peer-address"] = "0.0.0.0"
    config = write_config(tmp_path, [entry])
    peer = Vtunnel("peer", "--config-path", config, "--vsock", f"unix:{socket_dir()}/v", log_dir=tmp_path)
    try:
        peer.wait_for_log("is not a loopback address")
        assert "WARNING" in peer.log
    finally:
        assert peer.stop() == 0


def test_a_gevent_without_the_internals_the_pump_needs_is_one_line_and_exit_1():
    done = subprocess.run([sys.executable, ROOT / "test/e2e/inject.py", "gevent_moved", "peer", "--config-path",
                           ROOT / "config.yaml"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("vtunnel: gevent ") and "has no socket._wait, which vtunnel's pump waits with" in \
        done.stderr and len(done.stderr.splitlines()) == 1


def test_debug_logging_explains_each_connection_and_local_numbers_a_client_once(tmp_path):
    """Which addresses each leg joins, how long the dial took, and whether bytes are spliced or copied;
    in `local`, the peer's and the host's lines of one client carry one number."""
    upstream = echo_server()
    sockets = socket_dir()
    entry = tunnel_entry("t", upstream.port)
    del entry["peer-address"], entry["peer-port"]
    entry["peer-socket"] = f"{sockets}/t.sock"
    vtunnel = Vtunnel("local", "--config-path", write_config(tmp_path, [entry]), "--log-level", "debug",
                      log_dir=tmp_path)
    try:
        vtunnel.wait_for_log("t: listening on tcp:127.0.0.1")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(entry["peer-socket"])
            sock.sendall(b"hello")
            assert sock.recv(5) == b"hello"
        wait_until(lambda: vtunnel.log.count("t #1 closed") == 2, what="both ends' close lines")
        log = vtunnel.log
        assert "t #1 opened from unix://" in log and "t #1 opened to 127.0.0.1:" in log and "#2" not in log
        leg = entry["vsock-host-port"]
        assert re.search(r"DEBUG t #1: dialled host in \d\.\d{3}s", log), log
        assert re.search(rf"DEBUG t #1: client {sockets}/t.sock -> unnamed, host 127.0.0.1:\d+ -> 127.0.0.1:{leg}; "
                         r"bytes move by splice", log), log
        assert re.search(rf"DEBUG t #1: peer 127.0.0.1:{leg} -> 127.0.0.1:\d+, upstream 127.0.0.1:\d+ -> "
                         rf"127.0.0.1:{upstream.port}; bytes move by copy through Python", log), log
    finally:
        vtunnel.stop()
        upstream.stop()


def test_status_with_nothing_there_is_one_line_and_exit_1():
    port = free_port()
    code, out, err = run_vtunnel("status", "--metrics", f"127.0.0.1:{port}")
    assert code == 1 and out == ""
    assert err == (f"vtunnel: cannot ask a vtunnel at 127.0.0.1:{port}: connection refused (is one running there "
                   f"with --metrics 127.0.0.1:{port}?)\n")


def test_check_shows_each_tunnel_s_direction_and_warns_about_a_reverse_tunnel_s_listener(tmp_path):
    reverse = {"name": "rev", "handshake-port": 9290, "vsock-peer-port": 9291, "host-listen-address": "0.0.0.0:8080",
               "upstream-server-address": "127.0.0.1:80"}
    piped = {**reverse, "name": "piped", "handshake-port": 9292, "vsock-peer-port": 9293,
             "host-listen-address": "npipe:////./pipe/docker_engine"}
    code, out, err = run_vtunnel("check", "--config-path", write_config(tmp_path, [tunnel_entry("fwd", 1), reverse,
                                                                                   piped]))
    assert code == 0, err
    rows = [line.split() for line in out.splitlines()[1:]]
    assert rows[0][:4] == ["fwd", "VM", "->", "host"] and rows[0][5].startswith("host:")
    assert rows[1] == ["rev", "host", "->", "VM", "9290", "peer:9291", "host", "0.0.0.0:8080", "127.0.0.1:80", "(in",
                       "the", "VM)", "open"]
    assert err.splitlines() == [
        "vtunnel: warning: tunnel 'rev': 0.0.0.0:8080 is not a loopback address: anyone who can reach it reaches "
        "127.0.0.1:80 in the VM",
        "vtunnel: warning: tunnel 'piped': a host here would refuse host-listen-address "
        f"npipe:////./pipe/docker_engine: named-pipe listeners need Windows; this is {sys.platform}",
    ]


@pytest.mark.parametrize("script, module, expected", [
    ("vtunnel.py", "gevent", "vtunnel: this Python ({}) has no module 'gevent': run vtunnel with the Python of"),
    ("vtunnel.py", "yaml", "vtunnel: this Python ({}) has no module 'yaml': run vtunnel with the Python of"),
    ("vtunnel.py", "docopt", "vtunnel: this Python ({}) has no module 'docopt': pip install docopt-ng"),
    ("test/bench/bench.py", "gevent", "bench: this Python ({}) has no module 'gevent': run tox -e bench"),
])
def test_a_python_without_a_dependency_gets_one_line_not_a_traceback(script, module, expected):
    """`python3 vtunnel.py` with a Python that lacks a dependency (the module hidden here): one line that
    says which and what to do, exit 1."""
    hide = f"import sys, runpy; sys.modules[{module!r}] = None; sys.argv = [{script!r}, '--help']; " \
           f"runpy.run_path({script!r}, run_name='__main__')"
    done = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert done.returncode == 1, done
    assert done.stderr.splitlines() == [done.stderr.strip()] and "Traceback" not in done.stderr
    assert done.stderr.startswith(expected.format(sys.executable)), done.stderr
