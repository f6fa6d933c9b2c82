"""Server interceptors: correlation id and deadline on the way in, errors to statuses on the way out.

`intercept_service` runs on grpcio's polling thread, so it only wraps the handler; all work
happens inside the wrapped behaviour, in the handler's thread. Wrapping keeps the behaviour's
attributes (`functools.wraps`): the health servicer's non-blocking `Watch` relies on one.

The wrapped handler of a method is made once and kept: grpcio asks every interceptor on every
call, and wrapping anew per call (closures, `functools.wraps`, a new handler tuple, for each of
the interceptors) costs CPU on the polling thread that every call passes through (figures in
docs/performance.md). So nothing of one call may go into the wrapper: `around` reads the call's
metadata from its context, in the handler's thread.
"""

from __future__ import annotations

import functools
import hmac
import logging
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import grpc

from domain import correlation
from domain.deadline import deadline_bound
from domain.errors import DomainError, PermissionDeniedError, UnauthenticatedError
from server import reply_metadata
from server.errors import code_for, to_status

log = logging.getLogger("orders.rpc")

CORRELATION_HEADER = "x-correlation-id"
Around = Callable[[str, grpc.ServicerContext], AbstractContextManager[None]]


def behaviour_name(handler: grpc.RpcMethodHandler) -> str:
    """The field of `handler` that holds its behaviour (`unary_unary`, ..., `stream_stream`)."""
    if handler.request_streaming:
        return "stream_stream" if handler.response_streaming else "stream_unary"
    return "unary_stream" if handler.response_streaming else "unary_unary"


def wrap_handler(handler: grpc.RpcMethodHandler, method: str, around: Around) -> grpc.RpcMethodHandler:
    """The same handler whose behaviour runs inside `around(method, context)`."""
    kind = behaviour_name(handler)
    behaviour = getattr(handler, kind)

    if handler.response_streaming and not getattr(behaviour, "experimental_non_blocking", False):

        @functools.wraps(behaviour)
        def streaming(
            request: Any, context: grpc.ServicerContext, *args: Any, **kwargs: Any
        ) -> Iterator[Any]:
            with around(method, context):
                yield from behaviour(request, context, *args, **kwargs)

        return handler._replace(**{kind: streaming})

    @functools.wraps(behaviour)
    def unary(request: Any, context: grpc.ServicerContext, *args: Any, **kwargs: Any) -> Any:
        with around(method, context):
            return behaviour(request, context, *args, **kwargs)

    return handler._replace(**{kind: unary})


def _metadata_value(context: grpc.ServicerContext, key: str) -> str | None:
    for item in context.invocation_metadata() or ():
        if item.key == key and isinstance(item.value, str):
            return str(item.value)
    return None


def call_deadline(context: grpc.ServicerContext) -> float | None:
    """The call's deadline on the monotonic clock; None when the client set none (grpcio then
    reports a time remaining of centuries)."""
    remaining = context.time_remaining()
    return time.monotonic() + remaining if remaining is not None and remaining < 1e9 else None


# What grpcio passes an interceptor: the next interceptor's (or the server's) handler lookup.
Continuation = Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None]


class KeptHandlers:
    """Handlers made from grpcio's, kept per method and made again only when the inner handler is
    not the one they were made from (an interceptor runs for every call: making them once matters)."""

    def __init__(self) -> None:
        self._kept: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(
        self,
        method: str,
        handler: grpc.RpcMethodHandler,
        make: Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler],
    ) -> grpc.RpcMethodHandler:
        kept = self._kept.get(method)
        if kept is not None and kept[0] is handler:
            return kept[1]
        made = make(method, handler)
        if len(self._kept) < 1024:  # methods are few; unknown names never get here (handler None)
            self._kept[method] = (handler, made)
        return made


class WrappingInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Base of this server's interceptors: the behaviour of every handler whose method starts with
    one of `prefixes` runs inside the context manager `around`, entered in the handler's thread
    with the method's name and the call's context. Wrapped handlers are kept per method (see the
    module docstring) and made again only if the inner handler is not the one wrapped before."""

    prefixes: tuple[str, ...] = ("/",)

    def __init__(self) -> None:
        self._wrapped = KeptHandlers()

    def around(self, method: str, context: grpc.ServicerContext) -> AbstractContextManager[None]:
        raise NotImplementedError

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(self.prefixes):
            return handler
        return self._wrapped.get(method, handler, self._wrap)

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        return wrap_handler(handler, method, self.around)


class CorrelationInterceptor(WrappingInterceptor):
    """Takes `x-correlation-id` (or makes one), binds it and the call's deadline for the handler,
    and echoes the id in the initial metadata, which later trailers cannot overwrite. A method with
    one response message, and a server stream named in `first_message_at_once` (one whose handler
    sends its first message as soon as it starts: WatchOrder's current order, Health/Watch's
    current status), sends it with that message (server.reply_metadata: no batch of its own); any
    other server stream sends it at once, before its first message, which may come much later."""

    def __init__(self, first_message_at_once: Collection[str] = ()) -> None:
        super().__init__()
        self._first_message_at_once = frozenset(first_message_at_once)
        reply_metadata.install()

    def sends_with_first_message(self, method: str, handler: grpc.RpcMethodHandler) -> bool:
        """Whether `method`'s initial metadata may wait for its first message."""
        return not handler.response_streaming or method in self._first_message_at_once

    @contextmanager
    def around(
        self, method: str, context: grpc.ServicerContext, with_reply: bool = False
    ) -> Iterator[None]:
        correlation_id = correlation.accept_or_new(_metadata_value(context, CORRELATION_HEADER))
        correlation.set_current(correlation_id)
        reply_metadata.send(context, ((CORRELATION_HEADER, correlation_id),), with_reply)
        with deadline_bound(call_deadline(context)):
            yield

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        with_reply = self.sends_with_first_message(method, handler)
        return wrap_handler(handler, method, functools.partial(self.around, with_reply=with_reply))


class ErrorInterceptor(WrappingInterceptor):
    """Maps exceptions of this service's own handlers to statuses (server.errors) and writes one
    access log line per call. Health and reflection answer for themselves."""

    prefixes = ("/orders.",)

    @contextmanager
    def around(self, method: str, context: grpc.ServicerContext) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        except Exception as error:
            code = code_for(error)
            elapsed_ms = (time.perf_counter() - started) * 1000
            if isinstance(error, DomainError):
                log.info("rpc %s code=%s duration_ms=%.1f: %s", method, code.name, elapsed_ms, error)
            else:
                log.error("rpc %s code=%s duration_ms=%.1f", method, code.name, elapsed_ms, exc_info=error)
            context.abort_with_status(to_status(error))
        else:
            log.info("rpc %s code=OK duration_ms=%.1f", method, (time.perf_counter() - started) * 1000)


class BearerTokenInterceptor(WrappingInterceptor):
    """Requires `authorization: Bearer <token>` on every service but health, which stays open to
    probes. On this service's own methods the token must also hold the method's scope
    (`method_scopes`; a method missing from it is refused to every token), elsewhere (server
    reflection) any valid token will do. Tokens are compared in constant time and never logged."""

    prefixes = ("/",)
    open_prefix = "/grpc.health.v1.Health/"

    def __init__(self, tokens: Mapping[str, frozenset[str]], method_scopes: Mapping[str, str]) -> None:
        super().__init__()
        self._tokens = tuple((token.encode(), scopes) for token, scopes in tokens.items())
        self._method_scopes = dict(method_scopes)

    def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        if handler_call_details.method.startswith(self.open_prefix):
            return continuation(handler_call_details)
        return super().intercept_service(continuation, handler_call_details)

    def _scopes(self, header: str | None) -> frozenset[str] | None:
        """The scopes of the offered token, None when it is not one of ours."""
        if header is None or not header.startswith("Bearer "):
            return None
        offered = header[len("Bearer ") :].strip().encode()
        found = None
        for token, scopes in self._tokens:  # no early exit: the time tells nothing of which matched
            if hmac.compare_digest(offered, token):
                found = scopes
        return found

    def _refusal(self, method: str, scopes: frozenset[str] | None) -> DomainError | None:
        if scopes is None:
            return UnauthenticatedError("a valid bearer token is required")
        if method.startswith(ErrorInterceptor.prefixes):
            needed = self._method_scopes.get(method)
            if needed is None:
                return PermissionDeniedError(f"no scope allows {method}")
            if needed not in scopes:
                return PermissionDeniedError(f"this token lacks the scope {needed}")
        return None

    @contextmanager
    def around(self, method: str, context: grpc.ServicerContext) -> Iterator[None]:
        refusal = self._refusal(method, self._scopes(_metadata_value(context, "authorization")))
        if refusal is None:
            yield
            return
        if method.startswith(ErrorInterceptor.prefixes):
            raise refusal  # ErrorInterceptor, outside this one, maps it and writes the access line
        log.info("rpc %s code=%s: %s", method, code_for(refusal).name, refusal)
        context.abort_with_status(to_status(refusal))
