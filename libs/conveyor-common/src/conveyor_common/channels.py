"""Options of the gRPC channels one service opens to another.

Addresses are gRPC targets: ``dns:///scheduler:50051`` (a headless Service in Kubernetes resolves to
every ready pod), ``ipv4:10.0.0.1:50051,10.0.0.2:50051`` or ``host:port``. With ``round_robin`` a
channel keeps a connection to every address and spreads calls over them, so scheduler replicas share
the load; gRPC's default ``pick_first`` would send everything to one replica.
"""

from __future__ import annotations

import json

Option = tuple[str, str | int]

ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})


KEEPALIVE: list[Option] = [
    ("grpc.keepalive_time_ms", 2_000),
    ("grpc.keepalive_timeout_ms", 2_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
"""Ping every 2 s and drop a connection whose peer has not answered within 2 s more: a replica that
is frozen (SIGSTOP, a VM stall, a half-dead node) keeps its TCP session, and without pings
round_robin would keep sending it calls. The servers permit pings this frequent
(``conveyor_common.grpc_server``)."""


def client_options(*extra: Option, lb_policy: str = "round_robin") -> list[Option]:
    """Keepalive, the load-balancing policy, then ``extra`` options."""
    options: list[Option] = list(KEEPALIVE)
    if lb_policy == "round_robin":
        options.append(("grpc.service_config", ROUND_ROBIN))
    return options + list(extra)
