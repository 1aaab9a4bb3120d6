"""Windows named pipes as vtunnel endpoints: npipe:////./pipe/NAME upstreams, and PipeListener,
where a reverse tunnel's Windows host listens.

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
import gevent.queue
import gevent.threadpool

AVAILABLE = sys.platform == "win32"
UNAVAILABLE_REASON = "named-pipe upstreams need Windows; this is " + sys.platform
CANNOT_LISTEN_REASON = "named-pipe listeners need Windows; this is " + sys.platform

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
ERROR_NO_DATA = 232  # a client connected and left before its instance was accepted
ERROR_PIPE_CONNECTED = 535  # a client connected before ConnectNamedPipe was called
FILE_FLAG_FIRST_PIPE_INSTANCE = 0x00080000
# A pipe client tells the server how far it may impersonate it. Without these flags the server may act
# as vtunnel's own token (SecurityImpersonation): a user who creates the upstream's pipe name while its
# real server is down, holding SeImpersonatePrivilege, would become vtunnel (elevated, under the README's
# Task Scheduler recipe). With them, the server may only ask who vtunnel is.
SECURITY_SQOS_PRESENT = 0x00100000
SECURITY_IDENTIFICATION = 1 << 16
FILE_FLAG_OVERLAPPED = 0x40000000
CLIENT_FLAGS = FILE_FLAG_OVERLAPPED | SECURITY_SQOS_PRESENT | SECURITY_IDENTIFICATION
PIPE_TYPE_BYTE = PIPE_READMODE_BYTE = 0  # not in _winapi, which has the message-mode ones
PIPE_REJECT_REMOTE_CLIENTS = 0x00000008
PIPE_UNLIMITED_INSTANCES = 255
PIPE_BUFFER = 64 * 1024
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
                                        _winapi.OPEN_EXISTING, CLIENT_FLAGS, _winapi.NULL)
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


def user_only_sddl():
    """A DACL in SDDL that admits only the user running vtunnel (and LocalSystem), full access."""
    return f"D:P(A;;GA;;;{_current_user_sid()})(A;;GA;;;SY)"


def _current_user_sid():
    import ctypes
    from ctypes import wintypes
    advapi32 = ctypes.WinDLL("advapi32", use_last_error=True)
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    token, size = wintypes.HANDLE(), wintypes.DWORD()
    kernel32.GetCurrentProcess.restype = wintypes.HANDLE
    process = wintypes.HANDLE(kernel32.GetCurrentProcess())
    if not advapi32.OpenProcessToken(process, 0x0008, ctypes.byref(token)):  # TOKEN_QUERY
        raise ctypes.WinError(ctypes.get_last_error())
    try:
        advapi32.GetTokenInformation(token, 1, None, 0, ctypes.byref(size))  # TokenUser: how big it is
        buffer = ctypes.create_string_buffer(size.value)
        if not advapi32.GetTokenInformation(token, 1, buffer, size, ctypes.byref(size)):
            raise ctypes.WinError(ctypes.get_last_error())
        sid = ctypes.cast(buffer, ctypes.POINTER(ctypes.c_void_p))[0]  # TOKEN_USER.User.Sid comes first
        text = wintypes.LPWSTR()
        if not advapi32.ConvertSidToStringSidW(ctypes.c_void_p(sid), ctypes.byref(text)):
            raise ctypes.WinError(ctypes.get_last_error())
        try:
            return text.value
        finally:
            kernel32.LocalFree(text)
    finally:
        kernel32.CloseHandle(token)


class SecurityAttributes:
    """A SECURITY_ATTRIBUTES made from SDDL, kept alive while pipes are created with it (`address`)."""

    def __init__(self, sddl):
        import ctypes
        from ctypes import wintypes

        class SECURITY_ATTRIBUTES(ctypes.Structure):  # noqa: N801 (the Windows name)
            _fields_ = [("nLength", wintypes.DWORD), ("lpSecurityDescriptor", ctypes.c_void_p),
                        ("bInheritHandle", wintypes.BOOL)]
        advapi32 = ctypes.WinDLL("advapi32", use_last_error=True)
        self.descriptor = ctypes.c_void_p()
        if not advapi32.ConvertStringSecurityDescriptorToSecurityDescriptorW(sddl, 1, ctypes.byref(self.descriptor),
                                                                             None):
            raise PipeError(errno.EINVAL, f"not a security descriptor Windows accepts: {sddl!r} "
                                          f"({ctypes.FormatError(ctypes.get_last_error())})")
        self.struct = SECURITY_ATTRIBUTES(ctypes.sizeof(SECURITY_ATTRIBUTES), self.descriptor, False)
        self.address = ctypes.addressof(self.struct)
        self._free = ctypes.WinDLL("kernel32").LocalFree

    def close(self):
        if self.descriptor:
            self._free(self.descriptor)
            self.descriptor = None


class PipeListener:
    """A named-pipe server, as a listening socket looks to an accept loop: accept() and close().

    `waiting` instances wait for clients at once, each in an overlapped ConnectNamedPipe, and
    one taken is replaced as soon as its client connects (not when accept() gets to it), so a
    burst of up to `waiting` clients never meets "all pipe instances are busy". The first
    instance is created with FILE_FLAG_FIRST_PIPE_INSTANCE: if another process serves the name
    already, listening fails rather than sharing it. Remote clients are refused
    (PIPE_REJECT_REMOTE_CLIENTS); the DACL admits only the user running vtunnel unless `sddl`
    says otherwise.
    """

    def __init__(self, path, sddl=None, waiting=16):
        if not AVAILABLE:
            raise PipeError(errno.EOPNOTSUPP, CANNOT_LISTEN_REASON)
        self.path, self.closed, self.security = path, False, None
        self.pending = {}  # handle -> the overlapped ConnectNamedPipe of each instance waiting for a client
        self.connected = gevent.queue.Queue()  # handles with a client, or the error that stopped a new instance
        try:
            self.security = SecurityAttributes(sddl or user_only_sddl())
            for index in range(waiting):
                self._add_instance(first=index == 0)
        except OSError:
            self.close()
            raise

    def _add_instance(self, first=False):
        open_mode = _winapi.PIPE_ACCESS_DUPLEX | _winapi.FILE_FLAG_OVERLAPPED
        if first:
            open_mode |= FILE_FLAG_FIRST_PIPE_INSTANCE
        try:
            handle = _winapi.CreateNamedPipe(self.path, open_mode, PIPE_TYPE_BYTE | PIPE_READMODE_BYTE
                                             | _winapi.PIPE_WAIT | PIPE_REJECT_REMOTE_CLIENTS,
                                             PIPE_UNLIMITED_INSTANCES, PIPE_BUFFER, PIPE_BUFFER, 0,
                                             self.security.address)
        except OSError as exc:
            if exc.winerror == 5 and first:  # ERROR_ACCESS_DENIED: the name is someone else's already
                raise PipeError(errno.EADDRINUSE, "another process serves this pipe already", self.path) from None
            raise PipeError(exc.errno, exc.strerror, self.path) from None
        try:
            overlapped = _winapi.ConnectNamedPipe(handle, overlapped=True)
        except OSError as exc:
            if exc.winerror != ERROR_NO_DATA:
                _winapi.CloseHandle(handle)
                raise PipeError(exc.errno, exc.strerror, self.path) from None
            overlapped = None  # a client came and went already: handed out, it ends at once
        self.pending[handle] = overlapped
        gevent.spawn(self._await_client, handle, overlapped)

    def _await_client(self, handle, overlapped):
        err = 0
        if overlapped is not None:
            try:
                _, err = run_in_thread(threadpool(), overlapped.GetOverlappedResult, True)
            except OSError as exc:
                err = getattr(exc, "winerror", None) or -1
        if self.closed:
            return  # close() has closed the handle
        self.pending.pop(handle, None)
        if err in (0, ERROR_NO_DATA, ERROR_PIPE_CONNECTED):
            self.connected.put(handle)
        else:
            _winapi.CloseHandle(handle)
        try:
            self._add_instance()
        except OSError as exc:
            self.connected.put(exc)

    def accept(self):
        """(a PipeStream for the next client, None): as socket.accept, the address unknown."""
        item = self.connected.get()
        if self.closed or item is None:
            raise OSError(errno.EBADF, "the pipe listener was closed")
        if isinstance(item, OSError):
            raise item
        return PipeStream(item, self.path), None

    def close(self):
        if self.closed:
            return
        self.closed = True
        for handle, overlapped in self.pending.items():
            if overlapped is not None:
                try:
                    overlapped.cancel()  # its waiting thread wakes with ERROR_OPERATION_ABORTED
                except OSError:
                    pass
            _winapi.CloseHandle(handle)
        self.pending.clear()
        while not self.connected.empty():  # clients connected but never accepted: closed
            item = self.connected.get()
            if isinstance(item, int):
                _winapi.CloseHandle(item)
        self.connected.put(None)  # wakes an accept() that waits
        if self.security is not None:
            self.security.close()


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
