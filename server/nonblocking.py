"""grpcio's non-blocking server streams, declared in one place.

A stream method marked `experimental_non_blocking` is called with a `send_response_callback` and
returns at once instead of holding one of the server's handler threads for the stream's whole life;
messages go out later through the callback, from whichever thread has them. `non_blocking` marks a
servicer method so and turns a missing callback (a grpcio without that support) into a clear error.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

Request = TypeVar("Request")
Servicer = TypeVar("Servicer")
Send = Callable[[Any], None]
StreamMethod = Callable[[Servicer, Request, grpc.ServicerContext, Send], None]
GrpcioMethod = Callable[[Servicer, Request, grpc.ServicerContext, Send | None], None]


def non_blocking(method: StreamMethod[Servicer, Request]) -> GrpcioMethod[Servicer, Request]:
    @functools.wraps(method)
    def stream(
        self: Servicer,
        request: Request,
        context: grpc.ServicerContext,
        send_response_callback: Send | None = None,
    ) -> None:
        if send_response_callback is None:
            raise RuntimeError(f"{method.__name__} needs grpcio's non-blocking streaming support")
        method(self, request, context, send_response_callback)

    stream.experimental_non_blocking = True  # type: ignore[attr-defined]
    stream.experimental_thread_pool = None  # type: ignore[attr-defined]
    return stream
