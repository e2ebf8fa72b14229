"""Options of the gRPC channels one service opens to another.

Addresses are gRPC targets: ``dns:///scheduler:50051`` (a headless Service in Kubernetes resolves to
every ready pod), ``ipv4:10.0.0.1:50051,10.0.0.2:50051`` or ``host:port``. With ``round_robin`` a
channel keeps a connection to every address and spreads calls over them, so scheduler replicas share
the load; gRPC's default ``pick_first`` would send everything to one replica.
"""

from __future__ import annotations

import json

import grpc

Option = tuple[str, str | int]

ROUND_ROBIN = json.dumps(
    {
        "loadBalancingConfig": [
            {
                "outlier_detection_experimental": {
                    "interval": "0.5s",
                    "baseEjectionTime": "5s",
                    "maxEjectionPercent": 50,
                    "failurePercentageEjection": {
                        "threshold": 60,
                        "enforcementPercentage": 100,
                        "minimumHosts": 2,
                        "requestVolume": 4,
                    },
                    "childPolicy": [{"round_robin": {}}],
                }
            }
        ]
    }
)
"""round_robin over every replica, with gRPC's outlier detection: a replica failing most of its
calls in half a second (a frozen one times them all out) is ejected for 5 s (longer when it comes
back still failing), at most half of the replicas at once. Measured with one of two replicas
SIGSTOPped: calls stop reaching it after ~0.7 s (keepalive alone: ~2 s; nothing: never)."""


KEEPALIVE: list[Option] = [
    ("grpc.keepalive_time_ms", 2_000),
    ("grpc.keepalive_timeout_ms", 2_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Without it an outstanding ping (gRPC's own, e.g. the BDP probe) waits 60 s for its ack and
    # the keepalive pings never start: a frozen peer would keep its subchannel READY for a minute.
    ("grpc.http2.ping_timeout_ms", 2_000),
]
"""Ping every 2 s and drop a connection whose peer has not answered within 2 s: a replica that is
frozen (SIGSTOP, a VM stall, a half-dead node) keeps its TCP session, and without pings round_robin
would keep sending it calls (measured: evicted after ~2 s instead of never). The servers permit
pings this frequent (``conveyor_common.grpc_server``)."""


RECONNECT: list[Option] = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 1_000),
]
"""Connect again to a replica that went away at least every second: gRPC's default waits 1 s, then
1.6 times longer each time up to 120 s, so a replica back after 6 s was reached after ~9.5 s."""


def client_options(*extra: Option, lb_policy: str = "round_robin") -> list[Option]:
    """Keepalive, reconnect pace, the load-balancing policy, then ``extra`` options."""
    options: list[Option] = [*KEEPALIVE, *RECONNECT]
    if lb_policy == "round_robin":
        options.append(("grpc.service_config", ROUND_ROBIN))
    return options + list(extra)


STREAM_REMOVED = "Stream removed"
"""grpc-core's details of a call whose connection went away before its status arrived (the peer
was killed, a proxy reset the connection): the call fails UNKNOWN with this text instead of
UNAVAILABLE (grpc/grpc#34076)."""


def call_code(exc: grpc.RpcError) -> grpc.StatusCode:
    """The status code of a failed call, with a lost connection (:data:`STREAM_REMOVED`) read as
    the UNAVAILABLE it is, so that callers retry it as any other transport failure instead of
    reporting an internal error. Our servers never answer UNKNOWN themselves (every unexpected
    exception becomes INTERNAL or a recognised status), so nothing else is reinterpreted."""
    code_fn = getattr(exc, "code", None)
    code: grpc.StatusCode = code_fn() if callable(code_fn) else grpc.StatusCode.UNKNOWN
    if code == grpc.StatusCode.UNKNOWN:
        details_fn = getattr(exc, "details", None)
        if callable(details_fn) and details_fn() == STREAM_REMOVED:
            return grpc.StatusCode.UNAVAILABLE
    return code
