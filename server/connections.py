"""The gRPC server's connection options: keepalive pings, idle and age limits (from Settings).

Without them a client that vanished without a FIN or RST (a crashed host, a NAT that forgot the
flow) keeps its connection, and every stream on it, open for as long as the kernel's TCP timers
allow; and a client keeps its first connection for ever, so new instances behind a TCP load
balancer get no traffic from it.
"""

from __future__ import annotations

from server.config import Settings

# The shortest interval between a client's own keepalive pings that the server tolerates; a client
# that pings more often gets GOAWAY ("too_many_pings").
CLIENT_PING_MIN_INTERVAL_MS = 10_000


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def connection_options(settings: Settings) -> list[tuple[str, int]]:
    """grpcio channel arguments for the server."""
    options = [
        ("grpc.keepalive_time_ms", _ms(settings.keepalive_time_s)),
        ("grpc.keepalive_timeout_ms", _ms(settings.keepalive_timeout_s)),
        # grpcio 1.85 times an unanswered ping out by this one, 60 s by default, whatever the
        # keepalive timeout says (tests/integration/test_stream_admission.py, with a blackholed
        # client).
        ("grpc.http2.ping_timeout_ms", _ms(settings.keepalive_timeout_s)),
        # By default the server sends two pings and then none until it sends data: a silent peer
        # holding only idle streams (Health/Watch, WatchOrder of a PENDING order) would never be
        # found out.
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", CLIENT_PING_MIN_INTERVAL_MS),
    ]
    if settings.max_connection_idle_s > 0:
        options.append(("grpc.max_connection_idle_ms", _ms(settings.max_connection_idle_s)))
    if settings.max_connection_age_s > 0:
        options.append(("grpc.max_connection_age_ms", _ms(settings.max_connection_age_s)))
        options.append(("grpc.max_connection_age_grace_ms", _ms(settings.max_connection_age_grace_s)))
    return options
