"""Named-pipe clients for the cross-OS tests, run under the Windows Python.

    python pipe_clients.py \\\\.\\pipe\\NAME CLIENTS BYTES

Opens the pipe CLIENTS times at once (no retry: a busy pipe is an error), each client writing BYTES
random bytes and reading as many back (an echo); prints "client N sent SHA256 got SHA256" for each,
then the pipe's DACL as Windows reports it ("dacl SDDL") beside the one vtunnel means to set
("wanted SDDL").
"""

import _winapi
import ctypes
import hashlib
import os
import sys
import threading
from ctypes import wintypes
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import vtunnel_npipe  # noqa: E402


def client(path, number, size, lines):
    handle = _winapi.CreateFile(path, _winapi.GENERIC_READ | _winapi.GENERIC_WRITE, 0, _winapi.NULL,
                                _winapi.OPEN_EXISTING, 0, _winapi.NULL)
    data = os.urandom(size)
    writer = threading.Thread(target=_winapi.WriteFile, args=(handle, data))
    writer.start()
    got = bytearray()
    while len(got) < size:
        chunk, _ = _winapi.ReadFile(handle, 65536)
        got += chunk
    writer.join()
    lines.append(f"client {number} sent {hashlib.sha256(data).hexdigest()} got {hashlib.sha256(got).hexdigest()}")
    if number == 0:
        lines.append(f"dacl {dacl(handle)}")
    _winapi.CloseHandle(handle)


def dacl(handle):
    advapi32 = ctypes.WinDLL("advapi32")
    descriptor, text = ctypes.c_void_p(), wintypes.LPWSTR()
    # SE_KERNEL_OBJECT, DACL_SECURITY_INFORMATION
    if advapi32.GetSecurityInfo(wintypes.HANDLE(handle), 6, 4, None, None, None, None, ctypes.byref(descriptor)):
        return "unreadable"
    advapi32.ConvertSecurityDescriptorToStringSecurityDescriptorW(descriptor, 1, 4, ctypes.byref(text), None)
    return text.value


def main(path, clients, size):
    lines = []
    threads = [threading.Thread(target=client, args=(path, n, size, lines)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print("\n".join(lines + [f"wanted {vtunnel_npipe.user_only_sddl()}"]), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
