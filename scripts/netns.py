"""Network namespaces as test hosts: one bridge, one namespace per host, a veth pair each.

    with Hosts(3) as hosts:            # needs root and iproute2
        hosts.exec(0, ["ip", "addr"])  # runs inside host 0
        hosts.address(1)               # e.g. 10.199.37.2

Everything created is removed on exit, also after a failure. Nothing is attached to the machine's
outside interface; the bridge gets an address of its own so the test process can reach the hosts.
"""
from __future__ import annotations

import ctypes
import secrets
import shutil
import subprocess
import os


def available() -> str | None:
    """None if namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root"
    if not shutil.which("ip"):
        return "needs iproute2 (ip)"
    return None


CLONE_NEWNET = 0x40000000


def enter(namespace: str) -> None:
    """Move the calling thread, and the threads, processes and sockets it makes afterwards, into a
    namespace made by Hosts (os.setns arrived in Python 3.12)."""
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {namespace}")
    finally:
        os.close(fd)


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


class Hosts:
    def __init__(self, n: int):
        self.n = n
        self.tag = "sr" + secrets.token_hex(2)          # interface names stay under 15 characters
        self.subnet = f"10.199.{secrets.randbelow(250) + 1}"
        self.bridge = f"{self.tag}br"
        self.namespaces = [f"{self.tag}h{k}" for k in range(n)]

    def address(self, k: int) -> str:
        return f"{self.subnet}.{k + 1}"

    @property
    def bridge_address(self) -> str:
        return f"{self.subnet}.254"

    def prefix(self, k: int) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[k]]

    def exec(self, k: int, cmd: list[str], **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.prefix(k) + cmd, **kw)

    def up(self) -> "Hosts":
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.bridge_address}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for k, ns in enumerate(self.namespaces):
            veth = f"{self.tag}v{k}"
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", veth, "master", self.bridge)
            _ip("link", "set", veth, "up")
            _ip("-n", ns, "addr", "add", f"{self.address(k)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        return self

    def down(self) -> None:
        for k, ns in enumerate(self.namespaces):
            _ip("link", "del", f"{self.tag}v{k}", check=False)  # removes both ends of the pair at once
            _ip("netns", "del", ns, check=False)
        _ip("link", "del", self.bridge, check=False)

    def __enter__(self) -> "Hosts":
        try:
            return self.up()
        except BaseException:
            self.down()
            raise

    def __exit__(self, *exc) -> None:
        self.down()


def leftovers(tag: str) -> list[str]:
    """Namespaces and links still named with `tag` (for tests that check cleanup)."""
    names = _ip("netns", "list").stdout.split() + _ip("-o", "link").stdout.split()
    return [x for x in names if tag in x]
