"""An idle proxy connection costs pilot little memory, even after it carried a large request.

Every Envoy holds its own TCP connection to pilot, and its EDS requests name every cluster of the
mesh (148 KB at 1,000 services). gRPC sizes a connection's next read by its last ones and keeps
what a read left unfilled until the connection reads again: with its defaults, a 64 KB block or
more per idle connection, 130-260 MB at 2,000 proxies (`pilot.xds.grpcoptions`). Measured here
over real gRPC and TCP: pilot's ADS server in a process of its own, 150 connections that each
sent one such request and went quiet, the server's allocated C heap before and after; and, as the control
that shows the measurement can see the difference, the same handler on gRPC's default read
buffering.
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
from multiprocessing.connection import Connection

import grpc
import psutil
from envoy.service.discovery.v3 import discovery_pb2
from prometheus_client import CollectorRegistry

from benchmarks.procs import inbound_connections
from pilot.model.proxy import identity_from_node
from pilot.testing.ads_client import SOTW_METHOD, make_node
from pilot.xds.cache import SnapshotCache
from pilot.xds.grpcoptions import server_options
from pilot.xds.server import AdsServer
from pilot.xds.status import StatusRegistry, XdsMetrics
from pilot.xds.typeurls import ENDPOINT
from tests.conformance.builders import snapshot

CONNECTIONS = 150
NODE = "sidecar~127.0.0.2~app.default~default.svc.cluster.local"
# 1,500 cluster names of ~100 bytes: a 150 KB SotW EDS request, as at 1,000 services.
NAMES = ["c1", *(f"outbound|8080|v{i % 3}|service-{i:05d}.team-{i % 40:02d}.svc.cluster.local{'-' * 40}"
                 for i in range(1_500))]


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _serve(conn: Connection, capped: bool) -> None:
    """The server process: pilot's ADS server (`capped`: as pilot starts it; else the same handler
    on gRPC's default read buffering); answers "heap" with the bytes its C heap has allocated
    (glibc's `mallinfo2`: gRPC allocates there; resident or not, a block held is a block a busy
    process has written to before)."""

    async def main() -> None:
        cache = SnapshotCache()
        node = make_node(NODE, labels={"app": "a"})
        cache.set(identity_from_node(node).proxy_class, snapshot({"c1": 1}))
        ads = AdsServer(cache, StatusRegistry(XdsMetrics(CollectorRegistry())))
        if capped:
            port = await ads.start("127.0.0.1", 0)
            stop = ads.stop
        else:
            defaults = [o for o in server_options(None) if o[0] != "grpc.experimental.tcp_max_read_buffer_size"]
            server = grpc.aio.server(options=defaults)
            server.add_generic_rpc_handlers((ads.handler(),))
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            stop = server.stop
        conn.send(port)
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        while await asyncio.to_thread(conn.recv) == "heap":
            await asyncio.sleep(0.2)
            info = libc.mallinfo2()
            conn.send(info.uordblks + info.hblkhd)
        await stop(0)

    asyncio.run(main())


async def _connect_and_go_quiet(port: int) -> tuple[list[grpc.aio.Channel], list[object]]:
    """CONNECTIONS proxies, each on its own TCP connection: one large EDS request, its answer
    read and ACKed (the ACK names the same clusters, as Envoy's do); the streams stay open and
    idle. Returns the channels and the calls (held, so that no call ends before the test does)."""
    request = discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=NAMES)
    request.node.CopyFrom(make_node(NODE, labels={"app": "a"}))
    raw = request.SerializeToString()
    assert len(raw) > 145_000
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(CONNECTIONS)]

    calls: list[object] = []

    async def one(channel: grpc.aio.Channel) -> None:
        call = channel.stream_stream(SOTW_METHOD)()
        calls.append(call)
        await call.write(raw)
        answer = discovery_pb2.DiscoveryResponse.FromString(await asyncio.wait_for(call.read(), 10))
        assert answer.type_url == ENDPOINT
        ack = discovery_pb2.DiscoveryRequest(type_url=ENDPOINT, resource_names=NAMES,
                                             version_info=answer.version_info, response_nonce=answer.nonce)
        await call.write(ack.SerializeToString())

    for start in range(0, CONNECTIONS, 25):
        await asyncio.gather(*(one(c) for c in channels[start:start + 25]))
    return channels, calls


async def _kb_per_connection(capped: bool) -> float:
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=_serve, args=(theirs, capped), daemon=True)
    process.start()
    channels: list[grpc.aio.Channel] = []
    try:
        port = await asyncio.to_thread(ours.recv)
        ours.send("heap")
        before: int = await asyncio.to_thread(ours.recv)
        channels, _calls = await _connect_and_go_quiet(port)
        ours.send("heap")
        after: int = await asyncio.to_thread(ours.recv)
        # one TCP connection per proxy, all still open
        assert inbound_connections(psutil.Process(process.pid)) == CONNECTIONS
        return (after - before) / CONNECTIONS / 1024
    finally:
        for channel in channels:
            await channel.close()
        ours.send("stop")
        process.join(10)
        if process.is_alive():
            process.kill()


async def test_an_idle_connection_keeps_no_large_read_buffer_after_a_large_request() -> None:
    pilot = await _kb_per_connection(capped=True)
    defaults = await _kb_per_connection(capped=False)
    # A connection with its idle stream at pilot: gRPC's transport and call state, the session,
    # one 8 KB read block (measured: ~43 KB); not a 64 KB block on top.
    assert pilot <= 64, (pilot, defaults)
    # The control: on gRPC's defaults the same connection keeps at least one 64 KB block more
    # (measured: ~124 KB), so the measurement above would see one.
    assert defaults - pilot >= 56, (pilot, defaults)
