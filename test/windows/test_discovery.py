"""Finding the VM under a real Windows Python (Wine in CI): ComputeSystem keys written by the test
into the (Wine) registry, read with winreg by vtunnel; the handshakes go over the FAKE Hyper-V
transport of helpers.FakeHyperV (loopback TCP: Wine cannot create AF_HYPERV sockets)."""

import sys
import uuid

import pytest

pytestmark = [pytest.mark.windows,
              pytest.mark.skipif(sys.platform != "win32", reason="the registry needs Windows (tox -e windows "
                                 "runs this under Wine)")]

if sys.platform == "win32":
    import winreg

    import vtunnel
    from helpers import FakeHyperV, eventually, free_port, listening, seed_server


@pytest.fixture
def compute_systems():
    """Add and remove GUID-named subkeys of ComputeSystem, as running VMs do."""
    added = []

    def add(name):
        winreg.CloseKey(winreg.CreateKey(winreg.HKEY_LOCAL_MACHINE, rf"{vtunnel.COMPUTE_SYSTEM_KEY}\{name}"))
        added.append(name)
        return name

    def remove(name):
        winreg.DeleteKey(winreg.HKEY_LOCAL_MACHINE, rf"{vtunnel.COMPUTE_SYSTEM_KEY}\{name}")
        added.remove(name)

    yield add, remove
    for name in list(added):
        remove(name)


def test_only_guid_named_keys_are_candidates(compute_systems):
    add, _ = compute_systems
    vm_a, vm_b = str(uuid.uuid4()).upper(), str(uuid.uuid4())
    add(vm_a)
    add("{" + vm_b + "}")
    add("not-a-vm")
    found = vtunnel.registry_vm_ids()
    assert vm_a in found and vm_b in found and "not-a-vm" not in found


def test_no_vm_and_no_wsl_means_no_candidates(compute_systems):
    # Wine has no wsl.exe: the fallback finds nothing, and says nothing went wrong.
    if vtunnel.registry_vm_ids():
        pytest.skip("this registry lists running VMs")
    assert vtunnel.wsl_vm_id() is None
    assert vtunnel.candidate_vm_ids() == []


def test_wsl_restart_moves_the_tunnel_to_the_new_vm(compute_systems, monkeypatch):
    add, remove = compute_systems
    monkeypatch.setattr(vtunnel, "PEER_CHECK_INTERVAL", 0.2)
    monkeypatch.setattr(vtunnel, "HANDSHAKE_BACKOFF", (0.05, 0.2))
    stranger, stranger_port = seed_server(b"not our peer".ljust(len(vtunnel.SEED_PHRASE)))
    peer, peer_port = seed_server()
    other_vm, old_vm = add(str(uuid.uuid4())), add(str(uuid.uuid4()))
    routes = {(other_vm, 7): stranger_port, (old_vm, 7): peer_port, (old_vm, 8): free_port()}
    tunnel = vtunnel.parse_config(
        "tunnel:\n- {name: t, handshake-port: 7, vsock-host-port: 8, peer-address: 127.0.0.1, peer-port: 1,"
        " upstream-server-address: '127.0.0.1:1'}\n")[0]
    service = vtunnel.Service(grace=0.1)
    service.start([vtunnel.Host(FakeHyperV(routes=routes), service)], [tunnel])  # the real registry discovery
    try:
        assert eventually(lambda: listening(routes[old_vm, 8])), "listening in the VM whose peer answers"
        # WSL restarts: its VM and peer vanish, a new GUID appears.
        peer.stop()
        remove(old_vm)
        new_peer, new_port = seed_server()
        new_vm = add(str(uuid.uuid4()))
        routes.update({(new_vm, 7): new_port, (new_vm, 8): free_port()})
        assert eventually(lambda: listening(routes[new_vm, 8])), "listening in the new VM"
        assert not listening(routes[old_vm, 8])
        new_peer.stop()
    finally:
        service.stopping.set()
        service.greenlets.kill()
        service._drain()
        stranger.stop()
