import re
import subprocess
import sys


def test_demo_trains_a_loopback_ring_and_prints_held_out_accuracy():
    proc = subprocess.run([sys.executable, "-m", "peer", "demo"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    accuracy = re.search(r"done: .* held-out accuracy ([0-9.]+)%", proc.stdout)
    assert accuracy and float(accuracy.group(1)) >= 90.0
    assert "demo finished in" in proc.stdout


def test_metrics_are_prometheus_text_and_count_what_happened():
    import json
    import urllib.request

    from conftest import http_post
    from peer.localring import LocalRing
    with LocalRing([[], []]) as ring:
        for _ in range(2):   # two requests of an unknown protocol version, refused
            code, _ = http_post(f"{ring.urls[0]}/jobs", json.dumps({"v": 7, "type": "job_start"}).encode(),
                                {"Content-Type": "application/json"})
            assert code == 400
        text = urllib.request.urlopen(f"{ring.urls[0]}/metrics", timeout=30).read().decode()
    lines = text.splitlines()
    assert "# TYPE splitring_peers_seen gauge" in lines and "splitring_peers_seen 1.0" in lines   # the other agent
    assert "# TYPE splitring_rejected_total counter" in lines
    assert 'splitring_rejected_total{code="version"} 2.0' in lines
