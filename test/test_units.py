"""The systemd unit files we ship (contrib/systemd) pass `systemd-analyze verify` without a warning
(verify exits 0 on unknown keys, so any output fails the test), and ask for what vtunnel speaks."""

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
