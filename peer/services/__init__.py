"""The services an agent mounts on its node: status, the data-plane server, job coordination (/jobs/*),
job work (/job/*) and the dashboard (/, /dashboard/*)."""
from peer.services.coordination import CoordinationService
from peer.services.dashboard import DashboardService
from peer.services.data import DataService
from peer.services.status import StatusService
from peer.services.work import WorkService

__all__ = ["CoordinationService", "DashboardService", "DataService", "StatusService", "WorkService"]
