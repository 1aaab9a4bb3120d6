"""The newcomer stage's own failures name their cause (issue 28): a port the README's example needs,
taken by another program, fails the stage at once with that reason, not after minutes of waiting as
"no answer through the tunnel"."""

import errno
import os
import shutil
import socket
import subprocess

import pytest

from helpers import ROOT


@pytest.mark.skipif(not shutil.which("bash") or not os.path.exists("/usr/bin/python3"), reason="needs bash and "
                    "/usr/bin/python3, as the stage does")
def test_a_taken_port_fails_the_newcomer_stage_at_once_with_the_reason():
    squatter = socket.socket()
    try:
        squatter.bind(("127.0.0.1", 4444))
        squatter.listen(1)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        squatter.close()
        squatter = None  # taken already, by someone else: the stage must say the same
    try:
        # the timeout: before, the stage waited 300 s for an answer through the tunnel, then blamed it
        done = subprocess.run(["bash", "test/newcomer.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done
        assert "port 4444 on 127.0.0.1 is taken by another program" in done.stderr, done.stderr
    finally:
        if squatter is not None:
            squatter.close()
