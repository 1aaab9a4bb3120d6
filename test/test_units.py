"""The systemd unit files we ship (contrib/systemd) pass `systemd-analyze verify` without a warning
(verify exits 0 on unknown keys, so any output fails the test), and ask for what vtunnel speaks."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT

UNITS = sorted((ROOT / "contrib/systemd").rglob("*.service"))


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="needs systemd-analyze (Debian: systemd)")
@pytest.mark.parametrize("unit", UNITS, ids=[str(u.relative_to(ROOT)) for u in UNITS])
def test_shipped_unit_verifies_cleanly(unit, tmp_path):
    text = unit.read_text()
    assert "Type=notify" in text and re.search(r"^WatchdogSec=\d+", text, re.M)
    assert re.search(r"^ExecStart=\S+/vtunnel peer --config-path ", text, re.M)
    # verify insists that ExecStart's program exists: this test's Python, running vtunnel, stands in for it.
    runnable = tmp_path / unit.name
    runnable.write_text(re.sub(r"^ExecStart=\S+", f"ExecStart={sys.executable} -m vtunnel", text, flags=re.M))
    done = subprocess.run(["systemd-analyze", "verify", runnable], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


SOCKETS = sorted((ROOT / "contrib/systemd").rglob("*.socket"))


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="needs systemd-analyze (Debian: systemd)")
@pytest.mark.parametrize("unit", SOCKETS, ids=[str(u.relative_to(ROOT)) for u in SOCKETS])
def test_shipped_socket_unit_verifies_cleanly_beside_its_service(unit, tmp_path):
    """The .socket unit (socket activation) names the service beside it, and listens where the shipped
    config.yaml's tunnel listens, so the two work together as shipped."""
    text = unit.read_text()
    assert "Service=vtunnel-peer.service" in text and re.search(r"^ListenStream=127\.0\.0\.1:3030$", text, re.M)
    assert "peer-port: 3030" in (ROOT / "config.yaml").read_text()
    service = unit.with_suffix(".service").read_text()
    (tmp_path / "vtunnel-peer.service").write_text(
        re.sub(r"^ExecStart=\S+", f"ExecStart={sys.executable} -m vtunnel", service, flags=re.M))
    (tmp_path / unit.name).write_text(text)
    user = ["--user"] if unit.parent.name == "user" else []
    done = subprocess.run(["systemd-analyze", *user, "verify", tmp_path / unit.name], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)} if user else None)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")
