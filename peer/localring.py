"""Start a ring of real agent processes on this machine (loopback, or inside network namespaces):
used by `splitring demo`, the tests and the benchmarks."""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def get_json(url: str, timeout: float = 30.0, key: bytes | None = None) -> dict:
    """GET url as JSON, signed with the ring key if one is given."""
    from peer.security import open_url

    with open_url(url, key, timeout=timeout) as r:
        return json.load(r)


class AgentProcess:
    def __init__(self, args: list[str], log_path: Path, prefix: list[str] | None = None, env: dict | None = None):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        cmd = (prefix or []) + [sys.executable, "-m", "peer", "agent", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.log,
                                     env={**os.environ, **env} if env else None)
        self.url = self.peer_id = None
        self.key: bytes | None = None  # the ring key, to read private status
        self.ready_at: float | None = None  # time.monotonic() when it printed its ready line

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        line = b""
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if line.startswith(b"splitring agent "):
                words = line.decode().split()
                self.peer_id = words[2]
                self.url = next(w for w in words if w.startswith(("http://", "https://")))
                self.ready_at = time.monotonic()
                return
            if not line and self.proc.poll() is not None:
                break
        raise RuntimeError(f"agent did not start: {self.log_path.read_text()[-2000:]}")

    def status(self) -> dict:
        return get_json(f"{self.url}/status", key=self.key)

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def make_certificate(cert: Path, key: Path) -> None:
    """A self-signed certificate and its key for --tls-cert/--tls-key (with the openssl command)."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "3650", "-subj", "/CN=splitring", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)


class LocalRing:
    """n agents; `data[k]` are agent k's data options (e.g. ["--data", "digits", "--shard", "0/3"]).
    With `secret`, every agent gets it in a file (`secret_file`) and the harness signs its calls.
    With `tls` (needs `secret`), agent k serves TLS with its own certificate, agent{k}.crt and agent{k}.key."""

    def __init__(self, data: list[list[str]], ring: str | None = None, interface: str = "127.0.0.1",
                 workdir: str | None = None, extra: list[str] | None = None, secret: str | None = None,
                 tls: bool = False, peer_ids: list[str] | None = None, cpus: list[str] | None = None,
                 env: dict[int, dict] | None = None):
        """peer_ids: fixed ids (and so a fixed ring order) instead of random ones. cpus: agent k runs on
        CPUs cpus[k] (--cpus). env: {k: variables} added to agent k's environment at its first start."""
        self.data, self.env = data, env or {}
        self.ring = ring or f"test-{secrets.token_hex(3)}"
        self.interface = interface
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="splitring-")
        self.workdir = Path(workdir or self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.extra = extra or []
        self.tls = tls
        if cpus is not None and len(cpus) != len(data):
            raise ValueError(f"cpus names {len(cpus)} agents' CPUs for {len(data)} agents")
        self.cpus = cpus
        for k, pid in enumerate(peer_ids or []):
            (self.workdir / f"agent{k}").mkdir(parents=True, exist_ok=True)
            (self.workdir / f"agent{k}" / "peer_id").write_text(pid)
        self.agents: list[AgentProcess] = []
        self.secret_file = self.key = None
        if secret:
            from peer.security import key_for

            self.secret_file = self.workdir / "secret"
            self.secret_file.write_text(secret)
            self.key = key_for(secret.encode(), self.ring)
            self.extra += ["--secret-file", str(self.secret_file)]

    def agent_args(self, k: int, port: int = 0) -> list[str]:
        tls = []
        if self.tls:
            cert, key = self.workdir / f"agent{k}.crt", self.workdir / f"agent{k}.key"
            if not cert.exists():
                make_certificate(cert, key)
            tls = ["--tls-cert", str(cert), "--tls-key", str(key)]
        return ["--ring", self.ring, "--interface", self.interface, "--port", str(port), "--threads", "1",
                "--state-dir", str(self.workdir / f"agent{k}"), *self.data[k], *self.extra, *tls,
                *(["--cpus", self.cpus[k]] if self.cpus else [])]

    def start(self, timeout: float = 60.0) -> "LocalRing":
        for k in range(len(self.data)):
            self.agents.append(AgentProcess(self.agent_args(k), self.workdir / f"agent{k}.log", env=self.env.get(k)))
            self.agents[-1].key = self.key
        for a in self.agents:
            a.wait_ready(timeout)
        self.wait_converged(timeout)
        return self

    def wait_converged(self, timeout: float) -> None:
        """Until every agent sees every other one."""
        deadline = time.monotonic() + timeout
        want = len(self.agents) - 1
        while time.monotonic() < deadline:
            if all(len(a.status()["peers"]) >= want for a in self.agents):
                return
            time.sleep(0.2)
        raise RuntimeError("agents did not discover each other: "
                           + "; ".join(f"{a.peer_id} sees {len(a.status()['peers'])}" for a in self.agents))

    def kill(self, k: int) -> None:
        """SIGKILL agent k and wait for it to be gone (its state dir stays)."""
        self.agents[k].proc.send_signal(signal.SIGKILL)
        self.agents[k].proc.wait()

    def restart(self, k: int, same_port: bool = False, timeout: float = 60.0) -> AgentProcess:
        """Stop agent k (SIGTERM, if it still runs) and start it again with the same state dir, so the same
        peer id, on the same port or a new one; returns the new process once it has printed its ready line."""
        old = self.agents[k]
        port = int(old.url.rsplit(":", 1)[1]) if same_port else 0
        old.stop()
        n = sum(1 for _ in self.workdir.glob(f"agent{k}.*.log")) + 1
        self.agents[k] = AgentProcess(self.agent_args(k, port), self.workdir / f"agent{k}.{n}.log")
        self.agents[k].key = self.key
        self.agents[k].wait_ready(timeout)
        return self.agents[k]

    @property
    def urls(self) -> list[str]:
        return [a.url for a in self.agents]

    def ring_order(self) -> list[AgentProcess]:
        """Agents in ring order (sorted by peer id, as the coordinator orders them)."""
        return sorted(self.agents, key=lambda a: a.peer_id)

    def stop(self) -> None:
        for a in self.agents:
            a.stop()
        if self._tmp:
            self._tmp.cleanup()

    def __enter__(self) -> "LocalRing":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


# The CLI as a terminal starts it, SIGINT at its default: a shell without job control starts background commands
# with SIGINT ignored, and then Python never raises KeyboardInterrupt (a suite run started that way saw
# `splitring train` ignore a test's Ctrl-C).
_AS_FROM_A_TERMINAL = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                       "from peer.cli import main; sys.exit(main())")


def train_process(peer_url: str, *args: str) -> subprocess.Popen:
    """`splitring train --peer URL ARGS` in the background (text pipes), stopped by SIGINT as by Ctrl-C."""
    return subprocess.Popen([sys.executable, "-c", _AS_FROM_A_TERMINAL, "train", "--peer", peer_url, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def train_cli(peer_url: str, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run `splitring train --peer URL ARGS --json` and return the completed process."""
    return subprocess.run([sys.executable, "-m", "peer", "train", "--peer", peer_url, "--json", *args],
                          capture_output=True, text=True, timeout=timeout, env=env or os.environ.copy())
