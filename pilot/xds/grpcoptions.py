"""The gRPC server options of pilot's ADS servers (`pilot.xds.server.AdsServer`).

Most of them are limits an xDS server needs (message sizes for a mesh's largest response,
keepalive as istiod sets it, room for a whole fleet reconnecting at once). One is about memory
per connection; without it, gRPC's read buffers were the largest single term of pilot's memory at
scale:

`READ_BUFFER_LIMIT`. gRPC's TCP endpoint sizes each read by what the connection's earlier reads
brought in; once that estimate passes 12 KB it reads into 64 KB blocks, and the part of a block
a read did not fill waits, allocated, for the connection's next read. A proxy's requests include
large ones (a SotW EDS request or ACK, and a delta EDS subscription, name every cluster of the
mesh: 148 KB at 1,000 services), so after its first EDS request every connection keeps at least
one 64 KB block while it sits idle (two per real Envoy, measured with 39 Envoy 1.40 sidecars):
at 2,000 proxies, each on its own connection as Envoys are, 130-260 MB of pilot's RSS. Capping
the read buffer (`grpc.experimental.tcp_max_read_buffer_size`) at gRPC's small block (8 KB)
keeps one small block per connection instead. Cost: a large request is read in 8 KB steps (a
148 KB one in about 19 reads instead of 3); at 2,000 proxies an endpoint change (2,000 EDS ACKs
of 148 KB) took the same CPU with the cap as without (`benchmarks/README.md`, session 36).
Measured at mission scale, one round: steady RSS 416 -> 315 MB (SotW), 351 -> 318 MB (delta).
"""

from __future__ import annotations

KEEPALIVE_TIMEOUT_MS = 10_000  # istiod's keepaliveTimeout
CONNECTION_AGE_GRACE_MS = 10_000  # istiod's MaxServerConnectionAgeGrace
READ_BUFFER_LIMIT = 8 * 1024  # gRPC's small read block; see the module docstring
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def server_options(max_connection_age: float | None) -> list[tuple[str, int]]:
    """gRPC's channel arguments for an ADS server; `max_connection_age` in seconds (None: unbounded)."""
    options: list[tuple[str, int]] = [
        # gRPC's default SO_REUSEPORT would let a second pilot share this port.
        ("grpc.so_reuseport", 0),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        # A fleet reconnecting at once (pilot restart) opens thousands of streams together;
        # gRPC's default of 1,000 pending calls would refuse most of them.
        ("grpc.server.max_pending_requests", 100_000),
        ("grpc.server.max_pending_requests_hard_limit", 100_000),
        ("grpc.experimental.tcp_max_read_buffer_size", READ_BUFFER_LIMIT),
    ]
    if max_connection_age:
        options += [("grpc.max_connection_age_ms", int(max_connection_age * 1000)),
                    ("grpc.max_connection_age_grace_ms", CONNECTION_AGE_GRACE_MS)]
    return options
