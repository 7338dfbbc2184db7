"""The TFJob rendezvous listens on the pod's own address, not every interface:
real sockets on two loopback addresses (127.0.0.2 serves, 127.0.0.1 must be
refused)."""

import json
import socket
import urllib.request

import pytest

from tf_codistill import tfjob
from tf_codistill.tfjob import TFJobCluster
from tf_codistill.topology import free_port

pytestmark = pytest.mark.usefixtures("horovod_installed")

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _connects(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


def test_rendezvous_serves_only_the_given_address():
    cluster = TFJobCluster(hosts=("127.0.0.2", "127.0.0.2"), ports=(1, 2), rank=0)
    port = free_port("127.0.0.2")
    described = {"hosts": list(cluster.hosts), "ports": list(cluster.ports)}
    server = tfjob._RendezvousProcess(port, cluster.slots(), described, 30, host="127.0.0.2")
    try:
        with _NO_PROXY.open(tfjob._kv_url("127.0.0.2", port, "cluster"), timeout=5) as reply:
            assert json.loads(reply.read().decode()) == described
        assert not _connects("127.0.0.1", port), "the rendezvous answered on an address it must not bind"
    finally:
        server.stop()
    assert not _connects("127.0.0.2", port)


def test_bind_address_prefers_the_pods_own(monkeypatch):
    monkeypatch.delenv(tfjob.RENDEZVOUS_BIND_ENV, raising=False)
    monkeypatch.delenv("POD_IP", raising=False)
    local = TFJobCluster(hosts=("127.0.0.3", "10.0.0.9"), ports=(2222, 2222), rank=0)
    assert tfjob.rendezvous_bind_address(local) == "127.0.0.3"  # the TF_CONFIG host, resolved
    monkeypatch.setenv("POD_IP", "10.1.2.3")
    assert tfjob.rendezvous_bind_address(local) == "10.1.2.3"  # the downward API wins
    monkeypatch.setenv(tfjob.RENDEZVOUS_BIND_ENV, "0.0.0.0")
    assert tfjob.rendezvous_bind_address(local) == "0.0.0.0"  # an explicit choice wins over both


def test_bind_address_falls_back_to_every_interface_with_a_note(monkeypatch, capsys):
    monkeypatch.delenv(tfjob.RENDEZVOUS_BIND_ENV, raising=False)
    monkeypatch.delenv("POD_IP", raising=False)
    # 192.0.2.1 (TEST-NET-1) is nobody's address here; an unresolvable name neither.
    for host in ("192.0.2.1", "no-such-host.invalid"):
        cluster = TFJobCluster(hosts=(host, "b"), ports=(2222, 2222), rank=0)
        assert tfjob.rendezvous_bind_address(cluster) == ""
        assert "every interface" in capsys.readouterr().out
