# SPDX-License-Identifier: Apache-2.0
"""Exceptions raised by the API layer, one per kind of failure a caller handles."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ApiError(Exception):
    """A request to the Kubernetes API failed.

    `status` is the HTTP status (0 when no answer came), `reason` the Status
    object's reason (`NotFound`, `Conflict`, ...), `message` its text.
    """

    def __init__(self, status: int, reason: str, message: str, *, what: str = "") -> None:
        self.status = status
        self.reason = reason
        self.message = message
        self.what = what
        prefix = f"{what}: " if what else ""
        super().__init__(f"{prefix}{reason or 'error'} ({status}): {message}")

    @property
    def retryable(self) -> bool:
        """Whether trying the same request again later may succeed."""
        return False


class NotFound(ApiError):
    """The object (or the API version) does not exist."""


class Conflict(ApiError):
    """Stale resourceVersion on update, or the object already exists on create."""

    @property
    def retryable(self) -> bool:
        return True


class AlreadyExists(Conflict):
    """Create of an object whose name is taken."""

    @property
    def retryable(self) -> bool:
        return False


class Forbidden(ApiError):
    """RBAC or an admission policy denied the request; fix the permissions."""


class Unauthorized(ApiError):
    """The credentials were not accepted; check the kubeconfig or token."""


class Invalid(ApiError):
    """The server rejected the object as invalid (422) or the request as bad (400)."""


class Undecodable(ApiError):
    """The server answered, but its JSON cannot be decoded here (nested deeper than
    orjson reads, or not JSON); asking again gets the same answer."""


class Gone(ApiError):
    """The resourceVersion is too old (410): list again."""


class Unavailable(ApiError):
    """The server could not be reached or is overloaded (5xx, 429, connection errors)."""

    @property
    def retryable(self) -> bool:
        return True


def error_from_status(
    status: int, body: Mapping[str, Any] | None, *, what: str = "", detail: str = ""
) -> ApiError:
    """Map an HTTP status and its `Status` body to the matching exception.

    `detail` is the message when there is no Status body (say, a proxy's page).
    """
    reason = str((body or {}).get("reason") or "")
    message = str((body or {}).get("message") or detail)
    cls: type[ApiError]
    if status == 404:
        cls = NotFound
    elif status == 409:
        cls = AlreadyExists if reason == "AlreadyExists" else Conflict
    elif status == 403:
        cls = Forbidden
    elif status == 401:
        cls = Unauthorized
    elif status in (400, 422):
        cls = Invalid
    elif status == 410:
        cls = Gone
    elif status == 429 or status >= 500:
        cls = Unavailable
    else:
        cls = ApiError
    return cls(status, reason or cls.__name__, message or f"HTTP {status}", what=what)
