"""The status a server call ended with, as the interceptors that observe calls (metrics, traces) see it."""

from __future__ import annotations

import grpc


def call_status(context: grpc.ServicerContext, error: BaseException | None) -> str:
    """The status code's name: what the handler set or aborted with, OK when it returned, else why it stopped."""
    code = context.code()
    if code is not None:
        return code.name
    if error is None:
        return "OK"
    # a stream closed under us (the client cancelled or went away): the call ended first
    return "CANCELLED" if isinstance(error, GeneratorExit) or not context.is_active() else "UNKNOWN"


def split_method(method: str | bytes) -> tuple[str, str]:
    """"/semsearch.v1.Index/Search" -> ("semsearch.v1.Index", "Search")."""
    if isinstance(method, bytes):
        method = method.decode()
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name
