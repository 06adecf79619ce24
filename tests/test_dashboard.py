"""The dashboard: its pure parts (traces, timelines, history), its access control on a live ring with a
secret (outsiders see public facts only and start nothing; one-time links; sessions that only read), and
the page itself in a real browser during a job."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path

import pytest

from peer.localring import LocalRing, train_cli, train_process
from peer.trace import History, Trace, clock_offset, stage_times, timeline, valid_spans
from protocols import ProtocolError
from protocols.auth import DASHBOARD_LINK_S, check_dashboard_link, dashboard_link, ring_key
from conftest import wait_until

KEY = ring_key(b"the secret", "lab")
SECRET = "the dashboard ring's secret"
ARTIFACTS = Path(os.environ.get("SPLITRING_ARTIFACTS", Path(__file__).parent.parent / "test-artifacts"))


# --- pure parts -----------------------------------------------------------------------------------
def test_trace_keeps_the_latest_steps_of_the_latest_training_rotation():
    t = Trace(kept=100)
    for rotation in (0, 1):
        for step in range(5):
            t.add("busy", f"F{step}", rotation, "train", step, 10 * rotation + step, 10 * rotation + step + 0.5)
    t.add("busy", "F0", 1, "eval", 0, 30, 31)   # evaluation is left out
    recent = t.recent(2)
    assert [(s[2], s[4]) for s in recent] == [(1, 3), (1, 4)]
    assert t.totals["busy"] == pytest.approx(5.0 + 1.0)


def test_timeline_puts_every_stage_on_one_clock_at_their_common_step():
    traces = {"a": [["busy", "F0", 0, "train", 3, 100.0, 100.2], ["send", "F0", 0, "train", 3, 100.2, 100.25],
                    ["busy", "F0", 0, "train", 4, 101.0, 101.1]],
              "b": [["wait", "F0", 0, "train", 3, 50.0, 50.3], ["busy", "F0", 0, "train", 3, 50.3, 50.5]]}
    tl = timeline(traces, {"a": 0.0, "b": 50.0})   # b's clock reads 50 s behind
    assert tl["step"] == 3   # step 4 was traced by a only
    assert tl["spans"]["a"] == [["busy", "F0", 0.0, 0.2], ["send", "F0", 0.2, 0.25]]
    assert tl["spans"]["b"] == [["wait", "F0", 0.0, 0.3], ["busy", "F0", 0.3, 0.5]]
    times = stage_times(tl)
    assert times["b"] == pytest.approx({"busy_s": 0.2, "wait_s": 0.3, "send_s": 0.0})
    assert timeline({"a": []}, {})["step"] is None


def test_bad_spans_from_a_peer_are_left_out():
    good = ["busy", "F0", 0, "train", 3, 1.0, 2.0]
    bad = [["nap", "F0", 0, "train", 3, 1.0, 2.0], ["busy", "F0", 0, "train", 3, float("nan"), 2.0],
           ["busy", "<img>" * 10, 0, "train", 3, 1.0, 2.0], ["busy", "F0", 0, "train"], "x", None,
           ["busy", "F0", 0, "train", True, 1.0, 2.0]]
    assert valid_spans([good, *bad]) == [good]
    assert valid_spans({"not": "a list"}) == []


def test_history_cut_drops_the_steps_a_rollback_undid():
    h = History(limit=10)
    for i in range(1, 8):
        h.add("steps", {"seconds": float(i), "job_step": i})
    h.add("epochs", {"seconds": 3.5, "job_step": 3, "accuracy": 0.5})
    h.cut("job_step", 4)
    assert [p["job_step"] for p in h.points("steps")] == [1, 2, 3, 4]
    assert [p["job_step"] for p in h.points("epochs")] == [3]


def test_clock_offset_is_exact_for_a_symmetric_round_trip():
    # their clock is ours + 7; the call took 2 s, answered in its middle
    assert clock_offset(sent=10.0, received=12.0, theirs=18.0) == -7.0


def test_history_stays_bounded_and_spread_over_the_whole_job():
    h = History(limit=100)
    for i in range(1, 10_001):
        h.add("steps", {"seconds": float(i), "job_step": i})
    kept = h.points("steps")
    assert len(kept) <= 101
    assert kept[0]["job_step"] == 1 and kept[-1]["job_step"] == 10_000
    gaps = {b["job_step"] - a["job_step"] for a, b in zip(kept[:-2], kept[1:-1])}
    assert len(gaps) == 1   # evenly spread (the latest point aside)
    assert [p["job_step"] for p in h.points("steps", after=9_990.0)] == [10_000]


def test_dashboard_links_are_refused_unless_fresh_signed_and_for_this_peer():
    now = 1_000_000.0
    link = dashboard_link(KEY, "peer-a", now)
    assert check_dashboard_link(KEY, "peer-a", link, now + 1) == link["nonce"]
    bad = {"other peer": (KEY, "peer-b", link, now),
           "expired": (KEY, "peer-a", link, now + DASHBOARD_LINK_S + 1),
           "other key": (ring_key(b"another", "lab"), "peer-a", link, now),
           "longer life": (KEY, "peer-a", dashboard_link(KEY, "peer-a", now, ttl=10 ** 6), now),
           "unicode digits": (KEY, "peer-a", {**link, "expires": "²"}, now),
           "huge": (KEY, "peer-a", {**link, "expires": "9" * 5000}, now),
           "changed nonce": (KEY, "peer-a", {**link, "nonce": "00" * 16}, now),
           "no mac": (KEY, "peer-a", {k: v for k, v in link.items() if k != "mac"}, now),
           "not a number": (KEY, "peer-a", {**link, "expires": "soon"}, now)}
    for what, args in bad.items():
        with pytest.raises(ProtocolError) as e:
            check_dashboard_link(*args)
        assert e.value.code == ("stale" if what in ("expired", "longer life") else "unauthenticated"), what
    assert "secret" not in json.dumps(link) and KEY.hex() not in json.dumps(link)


# --- a live ring with a secret --------------------------------------------------------------------
class Browserless:
    """An HTTP client with its own cookie jar that does not sign anything: what a browser would do."""

    def __init__(self):
        self.jar = CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))

    def get(self, url: str, **kw) -> tuple[int, bytes, dict]:
        try:
            with self.opener.open(url, timeout=30, **kw) as r:
                return r.status, r.read(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read(), dict(e.headers)

    def state(self, url: str) -> dict:
        status, body, _ = self.get(url + "/dashboard/state")
        assert status == 200, body
        return json.loads(body)


def link_for(url: str, ring: LocalRing) -> str:
    proc = subprocess.run([sys.executable, "-m", "peer", "dashboard", "--peer", url, "--secret-file",
                           str(ring.secret_file)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def secret_ring():
    with LocalRing([["--data", "digits", "--shard", f"{k}/3"] for k in range(3)], secret=SECRET) as ring:
        yield ring


def test_without_a_link_the_dashboard_shows_only_public_facts(secret_ring):
    url = secret_ring.urls[0]
    b = Browserless()
    status, page, headers = b.get(url + "/")
    assert status == 200 and b"<!doctype html>" in page and SECRET.encode() not in page
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    public = json.loads(urllib.request.urlopen(url + "/status").read())
    st = b.state(url)
    assert st == {"me": {k: public[k] for k in ("peer", "ring", "version", "capabilities")}, "private": False}
    # the event stream too: its first update is the public one
    with urllib.request.urlopen(url + "/dashboard/events", timeout=30) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        first = r.readline()
    assert json.loads(first.removeprefix(b"data: ")) == st


def test_forged_expired_reused_or_foreign_links_open_nothing(secret_ring):
    a, b_url = secret_ring.urls[0], secret_ring.urls[1]
    good = link_for(a, secret_ring)
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(good).query))
    wrong_key = ring_key(b"not the secret", secret_ring.ring)
    forged = {
        "no link": {},
        "another secret": dashboard_link(wrong_key, query["peer"], time.time()),
        "expired": dashboard_link(secret_ring.key, query["peer"], time.time() - DASHBOARD_LINK_S - 1),
        "another peer's": dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(link_for(b_url, secret_ring)).query)),
    }
    for what, q in forged.items():
        b = Browserless()
        status, body, headers = b.get(f"{a}/dashboard/login?{urllib.parse.urlencode(q)}")
        assert status == 401, what
        assert json.loads(body)["error"] in ("unauthenticated", "stale"), what
        assert "Set-Cookie" not in headers, what
        assert b.state(a)["private"] is False, what
    b = Browserless()
    status, _, _ = b.get(good)   # follows the redirect to the page
    assert status == 200
    cookie, = list(b.jar)
    assert cookie.has_nonstandard_attr("HttpOnly") and cookie.get_nonstandard_attr("SameSite") == "Strict"
    assert SECRET not in cookie.value and secret_ring.key.hex() not in cookie.value
    assert b.state(a)["private"] is True
    assert Browserless().get(good)[0] == 401   # a link works once
    assert b.state(b_url)["private"] is False   # a session is one peer's


def test_a_session_reads_but_starts_or_stops_nothing(secret_ring):
    a = secret_ring.urls[0]
    b = Browserless()
    assert b.get(link_for(a, secret_ring))[0] == 200
    st = b.state(a)
    assert st["private"] and {p["peer"] for p in st["ring"]} == {x.peer_id for x in secret_ring.agents}
    before = st["jobs"]
    body = json.dumps({"v": 1, "type": "job_start", "config": {}}).encode()
    for method, path, data in [("POST", "/jobs", body), ("POST", "/jobs/0123456789ab/cancel", b""),
                               ("GET", "/jobs", None), ("GET", "/metrics", None), ("POST", "/job/abort", b"{}")]:
        req = urllib.request.Request(a + path, data=data, method=method, headers={"Content-Type": "application/json"})
        status, reply, _ = b.get(req)
        assert status == 401 and json.loads(reply)["error"] == "unauthenticated", (method, path)
    assert b.state(a)["jobs"] == before   # nothing was started


def test_pages_without_a_session_cannot_crowd_out_the_ring(secret_ring):
    from peer.services.dashboard import MAX_WATCHERS

    url = secret_ring.urls[2]
    streams = [urllib.request.urlopen(url + "/dashboard/events", timeout=30) for _ in range(MAX_WATCHERS[False])]
    try:
        assert all(s.readline().startswith(b"data: ") for s in streams)
        status, body, _ = Browserless().get(url + "/dashboard/events")
        assert status == 429 and json.loads(body)["error"] == "busy"
        member = Browserless()   # a session still gets in
        assert member.get(link_for(url, secret_ring))[0] == 200
        with member.opener.open(url + "/dashboard/events", timeout=30) as r:
            assert json.loads(r.readline().removeprefix(b"data: "))["private"] is True
    finally:
        for s in streams:
            s.close()

    def admitted() -> bool:   # the closed streams' slots are free again
        try:
            with urllib.request.urlopen(url + "/dashboard/events", timeout=30) as r:
                return r.readline().startswith(b"data: ")
        except urllib.error.HTTPError:
            return False
    wait_until(admitted, 30, "a slot freed by a page that left")


def metric(text: str, name: str, **labels) -> float:
    """One sample's value from Prometheus text (0 if absent)."""
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    return next((float(line.split()[-1]) for line in text.splitlines() if line.split(" ")[0] == want), 0.0)


def test_metrics_give_the_numbers_the_dashboard_draws(secret_ring, tmp_path):
    from peer.security import open_url

    env = {**os.environ, "SPLITRING_SECRET_FILE": str(secret_ring.secret_file)}
    coordinator = secret_ring.urls[2]
    steps_file = tmp_path / "steps.jsonl"
    proc = train_cli(coordinator, "--model", "mlp", "--epochs", "1", "--batch-size", "32", "--split", "even",
                     "--metrics-out", str(steps_file), env=env)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    events = [json.loads(line) for line in steps_file.read_text().splitlines()]
    steps = [e for e in events if e["event"] == "step"]
    text = open_url(coordinator + "/metrics", secret_ring.key).read().decode()
    job = summary["job"]
    assert metric(text, "splitring_job_steps_total", job=job) == len(steps) == steps[-1]["job_step"]
    assert metric(text, "splitring_job_loss", job=job) == pytest.approx(summary["final_loss"])
    assert metric(text, "splitring_job_accuracy", job=job) == pytest.approx(summary["accuracy"])
    assert metric(text, "splitring_job_samples_per_second", job=job) == pytest.approx(steps[-1]["samples_per_s"])
    for url, agent in zip(secret_ring.urls, secret_ring.agents):   # every stage's time, as the summary adds it up
        text = open_url(url + "/metrics", secret_ring.key).read().decode()
        mine = summary["stages"][agent.peer_id]
        for kind in ("busy", "wait", "send"):
            assert metric(text, "splitring_stage_seconds_total", kind=kind) >= mine[f"{kind}_s"] > 0


def test_a_client_helper_job_shows_its_schedule_and_rounds(secret_ring):
    env = {**os.environ, "SPLITRING_SECRET_FILE": str(secret_ring.secret_file)}
    c0, c1, h = (a.peer_id for a in secret_ring.agents)
    url = secret_ring.urls[1]
    proc = train_cli(url, "--scheme", "splitfed-v1", "--clients", f"{c0},{c1}", "--helpers", h, "--rounds", "2",
                     "--batch-size", "32", env=env)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    b = Browserless()
    assert b.get(link_for(url, secret_ring))[0] == 200
    job = b.state(url)["job"]
    assert job["job"] == summary["job"] and job["state"] == "done" and job["current"] is None
    assert set(job["schedule"]["orders"]) == {h}
    assert {c for c, _ in job["schedule"]["orders"][h]} == {c0, c1}
    rounds = job["history"]["rounds"]
    assert [r["round"] for r in rounds] == [0, 1] == [r["round"] for r in summary["history"]["rounds"]]
    assert rounds[0]["seconds"] < rounds[1]["seconds"]


# --- the page in a real browser -------------------------------------------------------------------
def chrome():
    """A headless Chromium driven by Selenium through Debian's chromedriver, or a skip saying what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("no browser: install Debian's chromium and chromium-driver (apt-get install -y chromium "
                    "chromium-driver; .ci/run does this as root)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=412,1400"):
        opts.add_argument(arg)   # (412 px wide: a phone's browser)
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_a_browser_shows_the_ring_the_chain_and_a_growing_loss_curve(secret_ring):
    url = secret_ring.urls[1]   # not the coordinator: its dashboard shows the job from its coordinator
    browser = chrome()
    train = train_process(secret_ring.urls[0], "--secret-file", str(secret_ring.secret_file), "--model", "mlp",
                          "--epochs", "30", "--batch-size", "8", "--split", "even", "--json")
    try:
        browser.get(link_for(url, secret_ring))

        def page() -> dict:   # read at once: the page redraws every second
            return browser.execute_script("""
                const all = (q) => Array.from(document.querySelectorAll(q));
                return {peers: all("#peers tbody tr").map((r) => r.dataset.peer),
                        stages: Object.fromEntries(all("#chain .stage").map((s) => [s.dataset.peer, s.innerText])),
                        points: Number(document.getElementById("loss-chart").dataset.points),
                        lines: all("#loss-chart polyline").length,
                        rows: Number(document.getElementById("timeline").dataset.rows)};""")
        ids = {a.peer_id for a in secret_ring.agents}
        wait_until(lambda: set(page()["peers"]) == ids, 60, "the three peers listed")
        wait_until(lambda: len(page()["stages"]) == 3, 120, "the chain drawn")
        stages = page()["stages"]
        assert set(stages) == ids
        ranges = sorted(tuple(int(v) for v in text.split("layers [")[1].split(")")[0].split(", "))
                        for text in stages.values())
        assert ranges[0][0] == 0 and all(r[1] == s[0] for r, s in zip(ranges, ranges[1:]))   # the model, in order

        wait_until(lambda: page()["points"] > 1, 60, "a loss curve")
        first = page()["points"]
        wait_until(lambda: page()["points"] > first, 60, f"the loss curve to grow past {first} points")
        assert page()["lines"] == 1
        wait_until(lambda: page()["rows"] == 3, 60, "a timeline row per stage")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        # the session cookie is out of the page's reach, and nothing is stored
        assert browser.execute_script("return [document.cookie, localStorage.length, sessionStorage.length]") == \
            ["", 0, 0]
    finally:
        browser.quit()
        train.send_signal(signal.SIGINT)   # the CLI stops the job cleanly
        train.communicate(timeout=120)
