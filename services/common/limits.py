"""How much a server takes on at once, so that no client can stall it or queue work without bound.

- At most `max_calls` calls run at once; one more is answered RESOURCE_EXHAUSTED at once, never
  queued. Health checks (`Check`) are exempt: they are cheap, and probes must answer under load.
- Streaming calls (server reflection, health `Watch`) hold a worker thread while the client is
  idle, so they get their own, smaller allowance (`max_streams`) and cannot take the threads that
  unary calls need: 100 idle streams leave `Search` answering as usual.
- A call whose deadline passed while it waited for a thread is dropped, not run.
- Reflection can be turned off; when a bearer token is configured it needs the token like any call.

The worker pool has a thread for every allowed call and stream, plus spares that answer the
refusals, so a refusal never waits behind the work it refuses.
"""

from __future__ import annotations

import argparse
import os
import threading
from dataclasses import dataclass

import grpc

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
SPARE_THREADS = 4


@dataclass(frozen=True)
class Limits:
    max_calls: int = 16  # unary calls at once
    max_streams: int = 4  # streaming calls (reflection, health Watch) at once
    max_open: int = 1000  # open calls of any kind (health watches included), grpc's own backstop
    reflection: bool = True

    @property
    def threads(self) -> int:
        return self.max_calls + self.max_streams + SPARE_THREADS


def same_kind(handler: grpc.RpcMethodHandler, behavior) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s shape (streaming or not, same (de)serializers) that runs `behavior`."""
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    return make(behavior, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def _behavior(handler: grpc.RpcMethodHandler):
    return handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream


class CallLimits(grpc.ServerInterceptor):
    """Refuses calls beyond the limits with RESOURCE_EXHAUSTED, and calls already past their deadline."""

    def __init__(self, limits: Limits):
        self.limits = limits
        self._calls = threading.BoundedSemaphore(limits.max_calls)
        self._streams = threading.BoundedSemaphore(limits.max_streams)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method == HEALTH_CHECK:
            return handler
        if handler.request_streaming or handler.response_streaming:
            return _limited(handler, self._streams, f"{self.limits.max_streams} streaming calls")
        return _limited(handler, self._calls, f"{self.limits.max_calls} calls")


def _limited(handler: grpc.RpcMethodHandler, slots: threading.BoundedSemaphore, what: str):
    behavior = _behavior(handler)

    def enter(context: grpc.ServicerContext) -> None:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed before it could start")
        if not slots.acquire(blocking=False):  # in the handler, so a call grpc refuses holds no slot
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the server is busy ({what} at once); retry later")

    if handler.response_streaming:
        def run(request, context):
            enter(context)
            try:
                yield from behavior(request, context)
            finally:
                slots.release()
    else:
        def run(request, context):
            enter(context)
            try:
                return behavior(request, context)
            finally:
                slots.release()

    return same_kind(handler, run)


def add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """--max-calls, --max-streams, --no-reflection (defaults: $MAX_CALLS, $MAX_STREAMS, $REFLECTION)."""
    env = os.environ.get
    defaults = Limits()
    parser.add_argument("--max-calls", type=int, default=int(env("MAX_CALLS", defaults.max_calls)),
                        help="calls served at once; more are refused with RESOURCE_EXHAUSTED "
                             f"(default: $MAX_CALLS or {defaults.max_calls})")
    parser.add_argument("--max-streams", type=int, default=int(env("MAX_STREAMS", defaults.max_streams)),
                        help="streaming calls (server reflection, health Watch) served at once "
                             f"(default: $MAX_STREAMS or {defaults.max_streams})")
    parser.add_argument("--no-reflection", dest="reflection", action="store_false",
                        default=env("REFLECTION", "1").lower() not in ("0", "false", "no", "off"),
                        help="do not serve gRPC server reflection (default: served unless $REFLECTION=0)")


def limits_from_args(args: argparse.Namespace) -> Limits:
    if args.max_calls < 1 or args.max_streams < 1:
        raise SystemExit("--max-calls and --max-streams must be at least 1")
    return Limits(max_calls=args.max_calls, max_streams=args.max_streams, reflection=args.reflection)
