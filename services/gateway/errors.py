"""Failures as the client sees them: an HTTP status and OpenAI's error object."""

from __future__ import annotations

from typing import Any

from kvmesh.schemas.messages import ErrorReply


class GatewayError(Exception):
    """A request failure with its HTTP status and OpenAI's `{"error": {...}}` fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,  # seconds: sent as the Retry-After header (429 / 503)
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def headers(self) -> dict[str, str] | None:
        if self.retry_after is None:
            return None
        return {"Retry-After": str(max(1, round(self.retry_after)))}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def invalid(cls, message: str, param: str | None = None, code: str | None = None) -> GatewayError:
        return cls(400, message, "invalid_request_error", param, code)

    @classmethod
    def model_not_found(cls, model: str) -> GatewayError:
        message = f"The model `{model}` does not exist."
        return cls(404, message, "invalid_request_error", "model", "model_not_found")

    @classmethod
    def unavailable(
        cls, message: str, code: str = "unavailable", retry_after: float | None = None
    ) -> GatewayError:
        return cls(503, message, "service_unavailable_error", None, code, retry_after)

    @classmethod
    def overloaded(cls, message: str, retry_after: float) -> GatewayError:
        """429: over capacity right now (the gateway's in-flight bound, or every worker's queue)."""
        return cls(429, message, "rate_limit_error", None, "overloaded", retry_after)

    @classmethod
    def unauthorized(cls) -> GatewayError:
        message = "Incorrect or missing API key: send it as `Authorization: Bearer <key>`."
        return cls(401, message, "invalid_request_error", None, "invalid_api_key")

    @classmethod
    def too_large(cls, limit: int) -> GatewayError:
        message = f"The request body exceeds {limit} bytes."
        return cls(413, message, "invalid_request_error", None, "request_too_large")

    @classmethod
    def timeout(cls, message: str, code: str = "timeout") -> GatewayError:
        """504; code: request_timeout | first_token_timeout | token_timeout."""
        return cls(504, message, "timeout_error", None, code)

    @classmethod
    def internal(cls, message: str) -> GatewayError:
        return cls(500, message, "server_error", None, "internal")


RETRY_AFTER_S = 1.0  # what a 429 / 503 asks the client to wait: queues here drain in about a second

# ErrorReply.code (schemas/messages.py) -> HTTP status; anything unknown is an internal error.
_STATUS_OF_CODE = {
    "invalid_request": 400,
    "prompt_too_long": 400,
    "no_workers": 503,
    "overloaded": 429,
    "unavailable": 503,
    "internal": 500,
}


def error_from_reply(reply: ErrorReply, service: str) -> GatewayError:
    """The client-facing error for a service's ErrorReply."""
    status = _STATUS_OF_CODE.get(reply.code, 500)
    if status == 400:
        code = "context_length_exceeded" if reply.code == "prompt_too_long" else None
        return GatewayError.invalid(reply.message, reply.field, code)
    if status == 429:
        return GatewayError.overloaded(f"{service}: {reply.message}", RETRY_AFTER_S)
    if status == 503:
        return GatewayError.unavailable(f"{service}: {reply.message}", reply.code, RETRY_AFTER_S)
    return GatewayError.internal(f"{service}: {reply.message}")
