"""The device agent: its HTTP and data-plane server, discovery, job coordination and work, the CLI.

Public names are imported on first use, so `python -m peer` stays quick to start:

    from peer import Agent, LocalRing
"""
from importlib import import_module

_WHERE = {"Agent": "peer.agent", "serve": "peer.agent", "Coordinator": "peer.coordinator",
          "PeerClient": "peer.client", "Discovery": "peer.discovery", "JobRuntime": "peer.worker",
          "JobError": "peer.worker", "LocalRing": "peer.localring", "StateDir": "peer.state",
          "JOB_LIMITS": "peer.limits", "LIMITS": "peer.limits"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'peer' has no attribute {name!r}")
    return getattr(import_module(_WHERE[name]), name)
