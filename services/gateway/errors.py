"""Failures as the client sees them: an HTTP status and OpenAI's error object."""

from __future__ import annotations

from typing import Any

from kvmesh.schemas.messages import ErrorReply


class GatewayError(Exception):
    """A request failure with its HTTP status and OpenAI's `{"error": {...}}` fields."""

    def __init__(
        self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

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
    def unavailable(cls, message: str, code: str = "unavailable") -> GatewayError:
        return cls(503, message, "service_unavailable_error", None, code)

    @classmethod
    def timeout(cls, message: str) -> GatewayError:
        return cls(504, message, "timeout_error", None, "timeout")

    @classmethod
    def internal(cls, message: str) -> GatewayError:
        return cls(500, message, "server_error", None, "internal")


# ErrorReply.code (schemas/messages.py) -> HTTP status; anything unknown is an internal error.
_STATUS_OF_CODE = {
    "invalid_request": 400,
    "prompt_too_long": 400,
    "no_workers": 503,
    "overloaded": 503,
    "unavailable": 503,
    "internal": 500,
}


def error_from_reply(reply: ErrorReply, service: str) -> GatewayError:
    """The client-facing error for a service's ErrorReply."""
    status = _STATUS_OF_CODE.get(reply.code, 500)
    if status == 400:
        code = "context_length_exceeded" if reply.code == "prompt_too_long" else None
        return GatewayError.invalid(reply.message, reply.field, code)
    if status == 503:
        return GatewayError.unavailable(f"{service}: {reply.message}", reply.code)
    return GatewayError.internal(f"{service}: {reply.message}")
