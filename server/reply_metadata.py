"""Initial metadata sent in the batch of the call's reply, not in a batch of its own.

`ServicerContext.send_initial_metadata` starts a gRPC batch of its own on every call: one more
operation for the core, one more completion event for grpcio's single polling thread to take the
GIL for, and one more wake-up of the call's condition. When a handler returns (or aborts), grpcio
sends whatever initial metadata is still unsent in the same batch as the message and the status
(`grpc._server._status`, `_abort`, `_send_response`, each through `_get_initial_metadata`).
`send_with_reply(context, metadata)` leaves the metadata on the call's state and `install` wraps
`_get_initial_metadata` so that the first initial metadata the call sends carries it: the client
sees the same headers, sent with the reply. A handler that sends initial metadata itself sends it
with these in front. Measured in docs/performance.md ("Ninth round").

grpcio has no public way to add to the reply's initial metadata, so this reaches into its private
module. `install` checks that the parts it relies on are there (grpcio is pinned to 1.85.x in
pyproject.toml, and tests/integration/test_reply_metadata.py checks the wrap against the installed
grpcio); where they are not, `send_with_reply` sends the metadata at once, as before.

For methods whose response is one message, and for server streams whose handler sends the first
message as soon as it starts (WatchOrder, Health/Watch: server.bootstrap names them). Another
stream's first message may come much later than its call, and a client waiting on
`initial_metadata()` should not wait for it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import grpc

Metadata = Sequence[tuple[str, str]]

_PENDING = "orders_initial_metadata"  # on grpcio's per-call state: the metadata to send with the reply
_lock = threading.Lock()
_installed: Callable[[Any, Any], Any] | None = None  # grpcio's own `_get_initial_metadata`


def install() -> bool:
    """Wrap grpcio's `_get_initial_metadata` once per process; False if this grpcio lacks what
    the wrap relies on (then `send_with_reply` sends at once)."""
    global _installed
    with _lock:
        if _installed is not None:
            return True
        try:
            import grpc._server as core
        except ImportError:
            return False
        original = getattr(core, "_get_initial_metadata", None)
        state = getattr(core, "_RPCState", None)
        if not callable(original) or state is None or "__slots__" in vars(state):
            return False

        def with_pending(state: Any, metadata: Any) -> Any:
            pending = getattr(state, _PENDING, None)
            if pending:
                metadata = pending if metadata is None else (*pending, *metadata)
            return original(state, metadata)

        core._get_initial_metadata = with_pending
        _installed = original
        return True


def send(context: grpc.ServicerContext, metadata: Metadata, with_reply: bool) -> None:
    """`metadata` as the call's initial metadata: with its first message (`send_with_reply`), or
    at once in a batch of its own."""
    if with_reply:
        send_with_reply(context, metadata)
    else:
        context.send_initial_metadata(metadata)


def send_with_reply(context: grpc.ServicerContext, metadata: Metadata) -> None:
    """`metadata` as the call's initial metadata, sent with its reply when `install` took; at once
    otherwise (or if the call's state is not grpcio's sync server's)."""
    state = getattr(context, "_state", None)
    if _installed is None or state is None or not hasattr(state, "initial_metadata_allowed"):
        context.send_initial_metadata(metadata)
        return
    with state.condition:
        if state.initial_metadata_allowed:
            setattr(state, _PENDING, tuple(metadata))
            return
    context.send_initial_metadata(metadata)  # too late for the reply: grpcio says so itself
