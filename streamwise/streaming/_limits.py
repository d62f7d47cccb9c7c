"""What one external client may hold of the ingress, as gRPC core server options.

gRPC core enforces every limit itself, before any Python code runs for a connection:
a connection past ``max_connections`` is closed as it is accepted, one that has not
finished its handshake (sent the HTTP/2 preface) in time is closed, and so is one
idle for too long or one that does not answer keepalive pings. When the process
runs out of descriptors anyway, gRPC's listener retries accepting every second, so
the ingress serves again as soon as a flood's connections are gone.
"""

from __future__ import annotations

import logging
import resource

from streamwise.config import GrpcOptions

log = logging.getLogger("streamwise.ingress")


def raise_descriptor_limit() -> int:
    """Raise this process's soft descriptor limit to its hard limit; the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(options: GrpcOptions) -> int:
    """``max_connections``, kept to half of the descriptors this process may open."""
    limit = raise_descriptor_limit()
    cap = min(options.max_connections, max(1, limit // 2))
    if cap < options.max_connections:
        log.warning(
            "the gRPC ingress accepts at most %d connections (half of this process's limit of %d open files), "
            "not max_connections=%d; raise the limit (ulimit -n) for more",
            cap, limit, options.max_connections,
        )
    return cap


def server_options(options: GrpcOptions) -> list[tuple[str, int]]:
    """gRPC core arguments for the ingress server."""
    def ms(seconds: float) -> int:
        return max(1, int(seconds * 1000))

    limit = options.max_message_length
    args = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.max_allowed_incoming_connections", connection_cap(options)),
        ("grpc.max_concurrent_streams", options.max_concurrent_streams),
        ("grpc.server_handshake_timeout_ms", ms(options.handshake_timeout_s)),
        ("grpc.keepalive_time_ms", ms(options.keepalive_time_s)),
        ("grpc.keepalive_permit_without_calls", 1),  # idle connections too: dead peers are found
        ("grpc.keepalive_timeout_ms", ms(options.keepalive_timeout_s)),
        ("grpc.http2.min_ping_interval_without_data_ms", int(options.min_client_ping_interval_s * 1000)),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.enable_channelz", 1),  # the default; the connections gauge reads it (``_connections``)
    ]
    if options.idle_timeout_s is not None:
        args.append(("grpc.max_connection_idle_ms", ms(options.idle_timeout_s)))
    return args
