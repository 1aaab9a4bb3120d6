"""The command line as a user meets it: real processes, exit codes, one-line errors."""

import socket
import subprocess
import sys

import pytest

from helpers import ROOT, Vtunnel, free_port, run_vtunnel, socket_dir, tunnel_entry, write_config


@pytest.fixture
def config(tmp_path):
    return write_config(tmp_path, [tunnel_entry("t", free_port())])


def test_version_and_help():
    code, out, _ = run_vtunnel("--version")
    assert code == 0 and out.startswith("vtunnel ")
    code, out, _ = run_vtunnel("--help")
    assert code == 0 and "vtunnel peer" in out and "--vsock TRANSPORT" in out


def test_check_prints_the_tunnels(tmp_path):
    code, out, err = run_vtunnel("check", "--config-path", ROOT / "config.yaml")
    assert code == 0, err
    assert out.splitlines()[0].split() == ["NAME", "HANDSHAKE", "VSOCK-HOST", "PEER", "UPSTREAM"]
    assert "tcpTunnel" in out and "127.0.0.1:3030" in out


@pytest.mark.parametrize("argv,expected", [
    (["peer"], "bad command line"),
    (["peer", "--config-path", "x", "--frob"], "bad command line: unexpected or incomplete: --frob"),
    (["check", "--config-path", "/nonexistent.yaml"], "/nonexistent.yaml: cannot read the config: no such file"),
    (["peer", "--config-path", str(ROOT / "config.yaml"), "--vsock", "carrier-pigeon"], "--vsock carrier-pigeon"),
    (["peer", "--config-path", str(ROOT / "config.yaml"), "--log-level", "loud"], "--log-level loud"),
    (["peer", "--config-path", str(ROOT / "config.yaml"), "--grace", "-1"], "--grace -1: expected a number of seconds"),
    (["peer", "--config-path", str(ROOT / "config.yaml"), "--stats-interval", "nan"], "--stats-interval nan"),
])
@pytest.mark.parametrize("optimize", [[], ["-O"]], ids=["", "python -O"])
def test_bad_command_lines_exit_2_without_traceback(argv, expected, optimize):
    code, out, err = run_vtunnel(*argv, python_options=optimize)
    assert code == 2
    assert err.startswith("vtunnel: ") and expected in err.splitlines()[0]
    assert "Traceback" not in err


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
        code, out, err = run_vtunnel("peer", "--config-path", config, "--vsock", f"unix:{socket_dir()}/v")
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("vtunnel: ")]
    assert errors == [f"vtunnel: tunnel 't': cannot listen on 127.0.0.1:{entry['peer-port']}: address already in use"]
    assert err.splitlines()[-1] == errors[0] and "Traceback" not in err


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
