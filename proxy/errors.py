"""The errors a call can end in, each knowing its HTTP status and its ledger outcome.

One middleware (app.py) turns any of these into the caller's dialect error body, so handlers
raise and never format errors themselves. Upstream failures live in upstream.py and derive from
`ProxyError` too.
"""

from __future__ import annotations


class ProxyError(Exception):
    status = 500
    type = "server_error"
    code = "internal_error"
    # The outcome recorded in the ledger, one of a small fixed set.
    outcome = "internal"

    def __init__(self, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ProxyError):
    status, type, code, outcome = 400, "invalid_request_error", "invalid_request", "bad_request"


class PayloadTooLarge(ProxyError):
    status, type, code, outcome = 413, "invalid_request_error", "request_too_large", "too_large"


class BodyTimeout(ProxyError):
    status, type, code, outcome = 408, "invalid_request_error", "request_timeout", "bad_request"


class UnknownModel(ProxyError):
    status, type, code, outcome = 404, "invalid_request_error", "model_not_found", "unknown_model"


class Unauthorized(ProxyError):
    status, type, code, outcome = 401, "authentication_error", "invalid_api_key", "unauthorized"


class UnsupportedMediaType(ProxyError):
    status, type, code, outcome = 415, "invalid_request_error", "unsupported_media_type", "bad_request"


class NotForwarded(ProxyError):
    """A path Tollgate cannot meter and is not configured to pass through."""

    status, type, code, outcome = 403, "invalid_request_error", "endpoint_not_forwarded", "bad_request"


class MethodNotAllowed(ProxyError):
    status, type, code, outcome = 405, "invalid_request_error", "method_not_allowed", "bad_request"


class LedgerUnavailable(ProxyError):
    """The ledger is failing and its backlog is full: nothing may be served unmetered."""

    status, type, code, outcome = 503, "server_error", "ledger_unavailable", "internal"


class LimitsUnavailable(ProxyError):
    """The shared limits store cannot be reached and its policy is "closed": no limit may be
    broken, so calls that limits apply to are not forwarded."""

    status, type, code, outcome = 503, "server_error", "limits_unavailable", "limits_unavailable"


class RateLimited(ProxyError):
    """Refused here, before the upstream: `type` names the limit that was hit."""

    status, code, outcome = 429, "rate_limit_exceeded", "rate_limited"

    def __init__(self, message: str, limit: str, headers: dict[str, str]) -> None:
        super().__init__(message, headers)
        self.type = limit


class BudgetExceeded(RateLimited):
    """Refused here because a spending budget is spent (or this call would overspend it)."""

    code, outcome = "budget_exceeded", "over_budget"

    def __init__(self, message: str, headers: dict[str, str]) -> None:
        super().__init__(message, "budget_exceeded", headers)


# Every ledger outcome, so accounting and exports can list them with zeros.
OUTCOMES = (
    "ok", "cache_hit", "upstream_status", "upstream_rate_limited", "timeout", "unreachable", "broken_stream",
    "stream_error", "bad_upstream_response", "response_too_large", "bad_request", "too_large", "unknown_model", "unauthorized", "rate_limited",
    "limits_unavailable", "over_budget", "cancelled", "internal",
)
# Outcomes of calls refused before any model was asked, for want of a key or by our own limits:
# counted by reason (/stats detail.refused, tollgate_refused_requests_total), never a ledger row
# each, never an error of the calls that were served.
REFUSED_OUTCOMES = frozenset({"unauthorized", "rate_limited", "limits_unavailable", "over_budget"})
