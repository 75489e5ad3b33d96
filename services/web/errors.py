"""gRPC status codes as HTTP statuses, and the JSON error body `{"error": ..., "code": ...}`."""

from __future__ import annotations

import grpc
from fastapi.responses import JSONResponse

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,  # the gateway's only use: too many images or bytes in one call
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def error_response(status: int, code: str, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": message, "code": code}, status_code=status, headers=headers)


def from_rpc_error(error: grpc.RpcError) -> JSONResponse:
    """The gateway's status and details, as HTTP (500 for codes a client cannot act on)."""
    code = error.code()
    return error_response(HTTP_STATUS.get(code, 500), code.name, error.details() or code.name)
