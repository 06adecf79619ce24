import re
import subprocess
import sys


def test_demo_trains_a_loopback_ring_and_prints_held_out_accuracy():
    proc = subprocess.run([sys.executable, "-m", "peer", "demo"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    accuracy = re.search(r"done: .* held-out accuracy ([0-9.]+)%", proc.stdout)
    assert accuracy and float(accuracy.group(1)) >= 90.0
    assert "demo finished in" in proc.stdout


def test_metrics_are_prometheus_text():
    from peer.localring import LocalRing
    import urllib.request
    with LocalRing([[]]) as ring:
        text = urllib.request.urlopen(f"{ring.urls[0]}/metrics", timeout=30).read().decode()
    assert "# TYPE splitring_peers_seen gauge" in text and "splitring_rejected" in text
