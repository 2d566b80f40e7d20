"""The control plane: targets, the token registry, approval requests, votes and grants, shared
by every gateway that serves the same users (SQLite in the state directory, or PostgreSQL)."""

from __future__ import annotations

from gateway.control.models import ApprovalRequest, Grant, RequestStatus, Vote
from gateway.control.rules import Ballot, Judgement, VoteRefused
from gateway.control.store import (
    ControlStore,
    ControlStoreUnavailable,
    UnknownRequest,
    control_store,
)

__all__ = [
    "ApprovalRequest",
    "Ballot",
    "ControlStore",
    "ControlStoreUnavailable",
    "Grant",
    "Judgement",
    "RequestStatus",
    "UnknownRequest",
    "Vote",
    "VoteRefused",
    "control_store",
]
