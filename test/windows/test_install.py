"""`py -m pip install .` on Windows gives `vtunnel.exe`: the Windows pip (under Wine) installs vtunnel's
wheel into a copy of the Windows Python, and the `vtunnel.exe` it makes runs. Run by `tox -e windows`.

Wine lacks CopyFile2, which Python 3.12's shutil calls while pip builds from a source tree, so the wheel is
built here by pip on Linux (vtunnel is pure Python: the same wheel) and installed by the Windows pip.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT

WINEPY = os.environ.get("VTUNNEL_WINEPY")
WINE_DIR = Path(os.environ.get("VTUNNEL_WINE", "/tmp/vtunnel-wine"))
pytestmark = pytest.mark.skipif(not WINEPY or sys.platform == "win32" or not shutil.which("wine")
                                or not (WINE_DIR / "py312/python.exe").exists(),
                                reason="needs the Windows Python under Wine (tox -e windows sets it up)")


def wine(*args, timeout=120):
    env = dict(os.environ, WINEPREFIX=str(WINE_DIR / "prefix"), WINEDEBUG="-all")
    return subprocess.run(["wine", *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)


def test_the_windows_pip_installs_vtunnel_exe_and_it_runs(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", tmp_path / "dist",
                    ROOT], check=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("vtunnel-*.whl"))
    python = tmp_path / "py312"
    shutil.copytree(WINE_DIR / "py312", python)  # the shared one stays as the other tests use it
    pip = next((WINE_DIR / "wheels").glob("pip-*.whl")) / "pip"
    installed = wine(python / "python.exe", pip, "install", "--no-index", "--no-deps", "--disable-pip-version-check",
                     "--no-warn-script-location", wheel)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    exe = python / "Scripts" / "vtunnel.exe"
    assert exe.exists()
    version = wine(exe, "--version")
    assert (version.returncode, version.stdout.strip()) == (0, "vtunnel 0.1.0")
    check = wine(exe, "check", "--config-path", ROOT / "config.yaml")
    assert check.returncode == 0
    assert check.stdout.split()[:6] == ["NAME", "DIRECTION", "HANDSHAKE", "VSOCK", "LISTEN", "UPSTREAM"]
