"""Windows named pipes as vtunnel endpoints (npipe:////./pipe/NAME upstreams)."""

import sys

AVAILABLE = sys.platform == "win32"
UNAVAILABLE_REASON = "named-pipe upstreams need Windows; this is " + sys.platform


class PipeError(OSError):
    """A named pipe could not be opened or used."""


def connect(path, timeout):
    """Open the named pipe `path` (\\\\.\\pipe\\NAME) as a stream endpoint."""
    if not AVAILABLE:
        raise PipeError(UNAVAILABLE_REASON)
    raise PipeError("named-pipe upstreams are not implemented yet")
