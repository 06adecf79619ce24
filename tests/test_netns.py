"""Multi-host: one agent per network namespace on a bridge made here, real mDNS between them."""
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import netns  # noqa: E402

from conftest import load_out, max_diff, summary_of, wait_until  # noqa: E402
from peer.localring import AgentProcess  # noqa: E402
from pipeline import data, reference  # noqa: E402
from pipeline.config import JobConfig  # noqa: E402

# skipped where namespaces cannot be made; conftest's pytest_terminal_summary then says so loudly
pytestmark = [pytest.mark.netns, pytest.mark.skipif(netns.available() is not None,
                                                    reason=f"network namespaces: {netns.available()}")]


def test_three_hosts_discover_each_other_by_mdns_and_train(tmp_path):
    hosts = netns.Hosts(3)
    agents = []
    try:
        with hosts:
            for k in range(3):
                args = ["--ring", "hosts", "--interface", hosts.address(k), "--port", "7000",
                        "--state-dir", str(tmp_path / f"h{k}"), "--data", "digits", "--shard", f"{k}/3"]
                agents.append(AgentProcess(args, tmp_path / f"h{k}.log", prefix=hosts.prefix(k)))
            for a in agents:
                a.wait_ready(60)
            assert [a.url for a in agents] == [f"http://{hosts.address(k)}:7000" for k in range(3)]
            # train from host 2, finding the ring by mDNS on that host's interface
            out = tmp_path / "model.pt"
            proc = hosts.exec(2, [sys.executable, "-m", "peer", "train", "--ring", "hosts", "--interface",
                                  hosts.address(2), "--discover-timeout", "30", "--epochs", "2", "--out", str(out),
                                  "--json"], capture_output=True, text=True, timeout=600)
            wait_until(lambda: all(len(a.status()["peers"]) == 2 for a in agents), 60, "every host sees the other two")
            for a in agents:
                peers = a.status()["peers"]
                assert {p["source"] for p in peers} == {"mdns"}
                assert {p["url"] for p in peers} == {x.url for x in agents} - {a.url}
            summary = summary_of(proc)
            order = sorted(agents, key=lambda a: a.peer_id)   # ring order: by peer id
            assert summary["ring"] == [a.peer_id for a in order]
            # across hosts, the ring trains what plain PyTorch trains over the same shards in ring order
            heads = [data.load("digits", f"{agents.index(a)}/3") for a in order]
            want = reference.train(JobConfig(epochs=2), heads).state_dict()
            assert max_diff(load_out(out), want) <= 1e-5
    finally:
        for a in agents:
            a.stop()
    assert netns.leftovers(hosts.tag) == []


def test_namespaces_are_removed_after_a_failure():
    hosts = netns.Hosts(2)
    with pytest.raises(RuntimeError):
        with hosts:
            assert hosts.exec(0, ["ip", "link", "show", "eth0"], capture_output=True).returncode == 0
            raise RuntimeError("boom")
    assert netns.leftovers(hosts.tag) == []


def test_a_process_that_enters_a_hosts_namespace_has_that_hosts_address():
    """netns.enter (the transport benchmark's --hosts puts its raw-socket and gloo processes in place with it)."""
    bind = "import socket, sys; s = socket.socket(); s.bind((sys.argv[1], 0)); print('bound')"
    hosts = netns.Hosts(1)
    with hosts:
        here = subprocess.run([sys.executable, "-c", bind, hosts.address(0)], capture_output=True, text=True)
        assert here.returncode != 0 and "Cannot assign requested address" in here.stderr   # not ours out here
        inside = subprocess.run([sys.executable, "-c", f"import netns; netns.enter({hosts.namespaces[0]!r}); " + bind,
                                 hosts.address(0)], capture_output=True, text=True, cwd=Path(netns.__file__).parent)
        assert inside.stdout.strip() == "bound", inside.stderr
    assert netns.leftovers(hosts.tag) == []
