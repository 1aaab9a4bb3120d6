"""Windows: named pipes as vtunnel endpoints (npipe:////./pipe/NAME upstreams, and PipeListener,
where a reverse tunnel's Windows host listens), and the overlapped I/O that pipes and Hyper-V
sockets share.

Every read and write of a pipe (PipeStream) or of a Hyper-V socket (SocketStream) is overlapped and
completes through one I/O completion port (COMPLETIONS): one thread waits on the port for every handle
of the process and hands each completion to the gevent loop, so an idle connection holds a pending
read, never a thread. Until 2026-12 each pending read held a thread of a 1,024-thread pool: with 1,030
idle connections the next one timed out, and every tunnel of the process with it. The calls are the
standard library's `_overlapped`, which asyncio's proactor drives the same way. A Hyper-V socket takes
the same WSARecv/WSASend path as any Winsock socket (Microsoft's go-winio, under the Go vtunnel, drives
AF_HYPERV through a completion port too); under Wine, which cannot make AF_HYPERV sockets, TCP sockets
stand in for them in the tests.

What has no overlapped form here blocks in a thread of DIALS, never behind an idle read: WaitNamedPipe
on a busy pipe, a Hyper-V connect, and a Hyper-V accept (one thread per listener).

A pipe opened with FILE_FLAG_OVERLAPPED can have a read and a write pending at once; a synchronous
handle would serialise a pending read with every write, and a tunnel must be full duplex. A stream
looks like a socket to the pump: recv, sendall, shutdown, settimeout, close.
"""

import collections
import errno
import socket
import sys
import threading
import time

import gevent
import gevent.event
import gevent.queue
import gevent.threadpool

AVAILABLE = sys.platform == "win32"
UNAVAILABLE_REASON = "named-pipe upstreams need Windows; this is " + sys.platform
CANNOT_LISTEN_REASON = "named-pipe listeners need Windows; this is " + sys.platform

if AVAILABLE:
    import _overlapped
    import _winapi

ERROR_FILE_NOT_FOUND = 2
ERROR_BROKEN_PIPE = 109
ERROR_SEM_TIMEOUT = 121
ERROR_PIPE_BUSY = 231
ERROR_MORE_DATA = 234
ERROR_PIPE_NOT_CONNECTED = 233
ERROR_OPERATION_ABORTED = 995
ERROR_NETNAME_DELETED = 64  # what a Winsock read says of a reset connection
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
DIAL_THREADS = 64  # dials, busy-pipe waits and Hyper-V accepts blocking at once
_dials = None


class PipeError(OSError):
    """A named pipe could not be opened or used."""


def dials():
    """The threads for the calls that have no overlapped form here (see the module's docstring)."""
    global _dials
    if _dials is None:
        _dials = gevent.threadpool.ThreadPool(DIAL_THREADS)
    return _dials


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


class CompletionPort:
    """One I/O completion port for every overlapped handle of the process, and the thread that waits on it.

    start() begins an overlapped call and returns its AsyncResult. The thread takes completions off
    the port and wakes the gevent loop (an async watcher, which any thread may send), where their
    results are set. While any call is pending the watcher keeps the loop alive: a greenlet waiting
    for a pipe is waiting for something. An Overlapped is kept until its completion has arrived,
    cancelled or not: Windows writes into it until then.
    """

    def __init__(self):
        self.port = None
        self.pending = {}  # OVERLAPPED address -> (Overlapped, AsyncResult), touched only in the loop's thread
        self.arrived = collections.deque()  # addresses of completed calls, from the thread to the loop
        self.open_streams = 0  # PipeStreams and SocketStreams not yet closed

    def associate(self, handle):
        """Let `handle` (a pipe handle or a socket's fileno) complete its overlapped calls here."""
        if self.port is None:
            self.port = _overlapped.CreateIoCompletionPort(_overlapped.INVALID_HANDLE_VALUE, _overlapped.NULL, 0, 0)
            self.wakeup = gevent.get_hub().loop.async_()
            self.wakeup.start(self._complete_arrived)
            self.wakeup.ref = False
            threading.Thread(target=self._wait_forever, name="vtunnel completions", daemon=True).start()
        _overlapped.CreateIoCompletionPort(handle, self.port, 0, 0)

    def start(self, handle, call, *args):
        """Begin the overlapped `call` (the name of an _overlapped.Overlapped method) on `handle`:
        (the Overlapped, an AsyncResult that gets what getresult() returns, or raises)."""
        overlapped, done = _overlapped.Overlapped(_overlapped.NULL), gevent.event.AsyncResult()
        if getattr(overlapped, call)(handle, *args):  # ConnectNamedPipe: connected already, nothing queued
            done.set(None)
        else:  # pending, or done at once: either way its completion is queued (raised: nothing was)
            self.pending[overlapped.address] = (overlapped, done)
            self.wakeup.ref = True
        return overlapped, done

    def _wait_forever(self):
        while True:
            completion = _overlapped.GetQueuedCompletionStatus(self.port, _overlapped.INFINITE)
            if completion is not None:
                self.arrived.append(completion[3])
                self.wakeup.send()

    def _complete_arrived(self):
        while self.arrived:
            overlapped, done = self.pending.pop(self.arrived.popleft(), (None, None))
            if done is None:
                continue  # not a call of ours: nothing to wake
            try:
                done.set(overlapped.getresult())
            except OSError as exc:
                done.set_exception(exc)
        self.wakeup.ref = bool(self.pending)


COMPLETIONS = CompletionPort()


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
            run_in_thread(dials(), _winapi.WaitNamedPipe, path, BUSY_WAIT_MS)
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
            COMPLETIONS.associate(handle)  # the PipeStream it becomes reads and writes through the port
            overlapped, done = COMPLETIONS.start(handle, "ConnectNamedPipe")
        except OSError as exc:
            if exc.winerror != ERROR_NO_DATA:
                _winapi.CloseHandle(handle)
                raise PipeError(exc.errno, exc.strerror, self.path) from None
            overlapped, done = None, None  # a client came and went already: handed out, it ends at once
        self.pending[handle] = overlapped
        gevent.spawn(self._await_client, handle, done)

    def _await_client(self, handle, done):
        err = 0
        if done is not None:
            try:
                done.get()
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
        return PipeStream(item, self.path, associated=True), None

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


class OverlappedStream:
    """The socket calls the pump uses (recv, sendall, settimeout, close), made of overlapped reads and
    writes that complete through COMPLETIONS. A subclass names its READ and WRITE calls.

    A call cut short by a timeout stays pending, and the next call of its kind takes it over: a
    read that timed out hands its bytes to the next recv, whatever size that asks for, and a write
    that timed out is finished before the next sendall writes anything. So no byte is lost and two
    reads (or writes) never run at once.
    """

    family = None  # not a socket: no TCP tuning, no SO_LINGER
    READ = WRITE = None
    READ_ARGS = WRITE_ARGS = ()  # what the _overlapped call takes after the buffer or size

    def __init__(self, handle, associated=False):
        self.handle, self.timeout, self.closed = handle, None, False
        self._read = None  # (overlapped, its AsyncResult) of a read still pending after a timeout
        self._write = None  # (overlapped, its AsyncResult, the bytes it writes) likewise
        if not associated:
            COMPLETIONS.associate(handle)
        COMPLETIONS.open_streams += 1

    def settimeout(self, timeout):
        self.timeout = timeout

    def recv(self, size):
        """Up to `size` bytes; b"" at the end of the stream."""
        self._check_open()
        if self._read is None:
            try:
                self._read = COMPLETIONS.start(self.handle, self.READ, size, *self.READ_ARGS)
            except OSError as exc:
                return self._failed_to_start(exc)
        if not self._wait_for_read(self._read[1]):
            raise socket.timeout("timed out")  # the read stays pending for the next call
        if self._read is None:  # given up: a drained pipe (PipeStream)
            return b""
        done, self._read = self._read[1], None
        return self._result(done)

    def _wait_for_read(self, done):
        """Whether the read finished within the timeout."""
        return bool(gevent.wait([done], timeout=self.timeout))

    def sendall(self, data):
        if self._write is not None:  # an earlier send cut short by a timeout goes out first
            self._finish_write(self._write[2])
        self._finish_write(memoryview(data))

    def _finish_write(self, view):
        while view:
            self._check_open()
            if self._write is None:
                try:
                    overlapped, done = COMPLETIONS.start(self.handle, self.WRITE, view, *self.WRITE_ARGS)
                except OSError as exc:
                    raise self._error(exc) from None
                self._write = (overlapped, done, view)
            if not gevent.wait([self._write[1]], timeout=self.timeout):
                raise socket.timeout("timed out")
            done, self._write = self._write[1], None
            view = view[self._result(done):]

    def close(self):
        if self.closed:
            return
        self.closed = True
        COMPLETIONS.open_streams -= 1
        for pending in (self._read, self._write):
            if pending is not None:
                try:
                    pending[0].cancel()  # CancelIoEx: its completion, ERROR_OPERATION_ABORTED, wakes the waiter
                except OSError:
                    pass
        self._close_handle()

    def _result(self, done):
        """What a finished overlapped call returned, or its error as an OSError the pump understands."""
        try:
            result = done.get()
        except OSError as exc:
            if self.closed:
                raise OSError(errno.EBADF, "closed in another greenlet") from None
            raise self._error(exc) from None
        if self.closed:
            raise OSError(errno.EBADF, "closed in another greenlet")
        return result

    def _check_open(self):
        if self.closed:
            raise OSError(errno.EBADF, "closed in another greenlet")


class PipeStream(OverlappedStream):
    """One end of an open named pipe."""

    READ, WRITE = "ReadFile", "WriteFile"

    def __init__(self, handle, path, associated=False):
        self.path = path
        self._drain = gevent.event.Event()  # set when the tunnel side has ended
        super().__init__(handle, associated)

    def _failed_to_start(self, exc):
        if exc.winerror in END_OF_STREAM:  # ReadFile says at once that the server has closed
            return b""
        raise self._error(exc) from None

    def _wait_for_read(self, done):
        # Wait for the read, for the tunnel side to end (then drain), or for the timeout.
        gevent.wait([done, self._drain], timeout=self.timeout, count=1)
        if not done.ready() and self._drain.is_set() and not self.closed:
            if not gevent.wait([done], timeout=DRAIN_SECONDS):
                self._read[0].cancel()
                self._read = None  # quiet since the tunnel side ended: the pipe's end, for our purposes
                return True
        return done.ready()

    def shutdown(self, how):
        # Pipes have no half-close: nothing more is written, and reads drain (see DRAIN_SECONDS).
        self._drain.set()

    def _close_handle(self):
        _winapi.CloseHandle(self.handle)
        self._drain.set()

    def _error(self, exc):
        winerror = getattr(exc, "winerror", None)
        if winerror in END_OF_STREAM:
            return OSError(errno.EPIPE, "the pipe was closed by its server", self.path)
        if winerror == ERROR_OPERATION_ABORTED:
            return OSError(errno.EBADF, "the pipe was closed")
        return OSError(errno.EIO, f"Windows error {winerror}", self.path)


class SocketStream(OverlappedStream):
    """A connected Winsock socket (a Hyper-V socket, or TCP standing in for one under Wine)."""

    READ, WRITE = "WSARecv", "WSASend"
    READ_ARGS = WRITE_ARGS = (0,)  # flags

    def __init__(self, sock):
        self.sock, self.family = sock, sock.family
        super().__init__(sock.fileno())

    def _failed_to_start(self, exc):
        raise self._error(exc) from None

    def shutdown(self, how):
        self.sock.shutdown(how)

    def setsockopt(self, *args):
        self.sock.setsockopt(*args)

    def _close_handle(self):
        self.sock.close()  # also ends its pending calls (WSA_OPERATION_ABORTED)

    def _error(self, exc):
        if getattr(exc, "winerror", None) in (ERROR_OPERATION_ABORTED, ERROR_NETNAME_DELETED):
            return ConnectionResetError(errno.ECONNRESET, "the connection was reset or closed")
        return exc
