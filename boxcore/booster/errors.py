"""What a booster's requests to boxd may raise."""

from __future__ import annotations

from boxcore.wire import Status

__all__ = ["BoosterError", "PermissionDenied", "Conflict", "InvalidRequest", "BoxdGone", "error_for"]


class BoosterError(Exception):
    """boxd refused a request; ``status`` and ``reason`` say why."""

    def __init__(self, status: str, reason: str, holder: str | None = None) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason
        self.holder = holder


class PermissionDenied(BoosterError):
    """The box's policy does not allow the request (``reason`` says which grant is missing)."""


class Conflict(BoosterError):
    """Another booster holds an overlapping rule (or the name); ``holder`` names it."""


class InvalidRequest(BoosterError):
    """boxd could not parse the request."""


class BoxdGone(ConnectionError):
    """The control connection to boxd is closed (or could not be opened)."""


_BY_STATUS = {Status.PERMISSION_DENIED.value: PermissionDenied, Status.CONFLICT.value: Conflict,
              Status.INVALID.value: InvalidRequest}


def error_for(status: str, reason: str, holder: str | None) -> BoosterError:
    """The exception for a refused request's reply."""
    return _BY_STATUS.get(status, BoosterError)(status, reason, holder)
