"""Windows named pipes as vtunnel endpoints (npipe:////./pipe/NAME upstreams).

A pipe opened with FILE_FLAG_OVERLAPPED can have a read and a write pending at
once; a synchronous handle would serialise a pending read with every write, and
a tunnel must be full duplex. The overlapped calls come from the standard
`_winapi` module; the waits for them run in a dedicated gevent ThreadPool, so
the hub never blocks. A PipeStream looks like a socket to the pump: recv,
sendall, shutdown, settimeout, close.
"""

import errno
import socket
import sys
import time

import gevent
import gevent.event
import gevent.threadpool

AVAILABLE = sys.platform == "win32"
UNAVAILABLE_REASON = "named-pipe upstreams need Windows; this is " + sys.platform

if AVAILABLE:
    import _winapi

ERROR_FILE_NOT_FOUND = 2
ERROR_BROKEN_PIPE = 109
ERROR_SEM_TIMEOUT = 121
ERROR_PIPE_BUSY = 231
ERROR_MORE_DATA = 234
ERROR_PIPE_NOT_CONNECTED = 233
ERROR_OPERATION_ABORTED = 995
ERROR_IO_PENDING = 997
END_OF_STREAM = (ERROR_BROKEN_PIPE, ERROR_PIPE_NOT_CONNECTED)

BUSY_WAIT_MS = 250  # one WaitNamedPipe, between tries at a busy pipe
# Pipes have no half-close, and most pipe servers (ssh-agent, docker) never close on their own: once
# the tunnel side has ended, the pipe is read until it ends or stays quiet this long, so a reply in
# flight still arrives but no connection outlives its client.
DRAIN_SECONDS = 5.0
_pool = None


class PipeError(OSError):
    """A named pipe could not be opened or used."""


def threadpool():
    """The pool that waits on pipe I/O: a pending read holds one thread for as long as it waits."""
    global _pool
    if _pool is None:
        _pool = gevent.threadpool.ThreadPool(1024)
    return _pool


def _capture(function, *args):
    # An exception raised in a pool thread would be printed by the hub as a traceback: carry it
    # back to the waiting greenlet as a value instead, to be raised there.
    try:
        return True, function(*args)
    except BaseException as exc:  # noqa: B036 (re-raised in the caller's greenlet)
        return False, exc


def spawn_in_thread(pool, function, *args):
    """Start function(*args) in `pool`; returns what `outcome` turns into its result."""
    return pool.spawn(_capture, function, *args)


def outcome(waiting):
    """The result of a spawn_in_thread call that has finished, or its exception raised here."""
    ok, value = waiting.get()
    if not ok:
        raise value
    return value


def run_in_thread(pool, function, *args):
    """function(*args) in a pool thread, from a greenlet: its result, or its exception."""
    return outcome(spawn_in_thread(pool, function, *args))


def connect(path, timeout):
    """Open the named pipe `path` (\\\\.\\pipe\\NAME), waiting up to `timeout` s while it is busy."""
    if not AVAILABLE:
        raise PipeError(UNAVAILABLE_REASON)
    deadline = time.monotonic() + timeout
    while True:
        try:
            handle = _winapi.CreateFile(path, _winapi.GENERIC_READ | _winapi.GENERIC_WRITE, 0, _winapi.NULL,
                                        _winapi.OPEN_EXISTING, _winapi.FILE_FLAG_OVERLAPPED, _winapi.NULL)
            return PipeStream(handle, path)
        except OSError as exc:
            if exc.winerror == ERROR_FILE_NOT_FOUND:
                raise PipeError(errno.ENOENT, "no such named pipe (is its server running?)", path) from None
            if exc.winerror != ERROR_PIPE_BUSY:
                raise PipeError(exc.errno, exc.strerror, path) from None
        # Every instance is taken: wait for one to free up, for as long as the timeout allows.
        if time.monotonic() >= deadline:
            raise PipeError(errno.EBUSY, f"all instances of the pipe stayed busy for {timeout:g}s", path)
        try:
            run_in_thread(threadpool(), _winapi.WaitNamedPipe, path, BUSY_WAIT_MS)
        except OSError as exc:
            if exc.winerror not in (ERROR_SEM_TIMEOUT, ERROR_FILE_NOT_FOUND):
                raise PipeError(exc.errno, exc.strerror, path) from None
            gevent.sleep(0.01)  # the pipe was between instances: try again


class PipeStream:
    """One end of an open pipe, with the socket calls the pump uses."""

    family = None  # not a socket: no TCP tuning, no SO_LINGER

    def __init__(self, handle, path):
        self.handle, self.path = handle, path
        self.timeout = None
        self.closed = False
        self._read = None  # (overlapped, its wait) of a read still pending after a timeout
        self._writing = None
        self._drain = gevent.event.Event()  # set when the tunnel side has ended

    def settimeout(self, timeout):
        self.timeout = timeout

    def recv(self, size):
        """Up to `size` bytes; b"" once the other end has closed the pipe."""
        self._check_open()
        if self._read is None:
            try:
                overlapped, _ = _winapi.ReadFile(self.handle, size, overlapped=True)
            except OSError as exc:
                if exc.winerror in END_OF_STREAM:
                    return b""
                raise
            self._read = (overlapped, spawn_in_thread(threadpool(), overlapped.GetOverlappedResult, True))
        overlapped, waiting = self._read
        # Wait for the read, for the tunnel side to end (then drain), or for the timeout.
        gevent.wait([waiting, self._drain], timeout=self.timeout, count=1)
        if not waiting.ready() and self._drain.is_set():
            gevent.wait([waiting], timeout=DRAIN_SECONDS)
            if not waiting.ready():
                return b""  # quiet since the tunnel side ended: the pipe's end, for our purposes
        if not waiting.ready():
            raise socket.timeout("timed out")  # the read stays pending for the next call
        self._read = None
        _, err = self._result(waiting)
        if err in END_OF_STREAM:
            return b""
        if err not in (0, ERROR_MORE_DATA):  # more data: the rest of a message comes with the next read
            raise self._error(err)
        return bytes(overlapped.getbuffer())

    def sendall(self, data):
        view = memoryview(data)
        while view:
            self._check_open()
            try:
                self._writing, err = _winapi.WriteFile(self.handle, view, overlapped=True)
            except OSError as exc:
                raise self._error(exc.winerror) from None
            waiting = spawn_in_thread(threadpool(), self._writing.GetOverlappedResult, True)
            if not gevent.wait([waiting], timeout=self.timeout):
                raise socket.timeout("timed out")
            written, err = self._result(waiting)
            self._writing = None
            if err:
                raise self._error(err)
            view = view[written:]

    def shutdown(self, how):
        # Pipes have no half-close: nothing more is written, and reads drain (see DRAIN_SECONDS).
        self._drain.set()

    def close(self):
        if self.closed:
            return
        self.closed = True
        for pending in (self._read[0] if self._read else None, self._writing):
            if pending is not None:
                try:
                    pending.cancel()  # CancelIoEx: the waiting thread wakes with ERROR_OPERATION_ABORTED
                except OSError:
                    pass
        _winapi.CloseHandle(self.handle)
        self._drain.set()

    def _result(self, waiting):
        """(bytes moved, Windows error) of a finished overlapped call."""
        try:
            result = outcome(waiting)
        except OSError as exc:
            if self.closed:
                raise OSError(errno.EBADF, "the pipe was closed") from None
            if getattr(exc, "winerror", None) in END_OF_STREAM:
                return 0, exc.winerror
            raise
        if self.closed:
            raise OSError(errno.EBADF, "the pipe was closed")
        return result

    def _check_open(self):
        if self.closed:
            raise OSError(errno.EBADF, "the pipe was closed")

    def _error(self, winerror):
        if winerror in END_OF_STREAM:
            return OSError(errno.EPIPE, "the pipe was closed by its server", self.path)
        if winerror == ERROR_OPERATION_ABORTED:
            return OSError(errno.EBADF, "the pipe was closed")
        return OSError(errno.EIO, f"Windows error {winerror}", self.path)
