"""One ADS stream's two halves and how they signal each other, and the open streams by Pod.

The ADS server (`pilot.xds.server`) runs each stream as a writer (its handler coroutine) and a
reader task (`read_requests`); `StreamSignals` is all they share. `PodStreams` finds the streams
of a Pod whose labels changed, so they can classify their Node again without reconnecting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from pilot.model.proxy import pod_of_node
from pilot.xds.writewave import WriteWave

log = logging.getLogger(__name__)


class StreamSignals:
    """What the reader tells the writer of one stream; both run on the event loop."""

    def __init__(self) -> None:
        self.wake = asyncio.Event()  # set by the reader (a request calls for an answer) and the cache
        self.dirty = False  # a handled request may call for a response
        self.closed = False  # the proxy ended the stream
        self.error: BaseException | None = None
        self.reclassify = False  # its Pod changed: classify the Node again (`PodStreams.changed`)
        self.node: Any = None  # the Node of a proxy in a Pod (a copy: the first request is not kept)


async def read_requests(read: Callable[[], Awaitable[Any]], session: Any, stream: StreamSignals,
                        wave: WriteWave | None = None) -> None:
    """Apply each request to the session as it arrives; wake the writer only when it must answer.

    `read` is the call's `context.read` (the bytes gRPC read, or `grpc.aio.EOF`), not the request
    iterator gRPC hands the handler: that iterator is an async generator whose frame keeps the
    last request it yielded while it waits for the next, so after an endpoint change every idle
    SotW stream kept its 148 KB EDS ACK (2,000 proxies: 296 MB, the mission benchmark's peak)
    until its next request, which may be hours away. Here the reader drops each request once it
    is applied, before it waits for the next.

    Sessions are synchronous state machines, so the reader can apply requests itself: a plain
    ACK costs no task switch, and not reading while one is applied is the backpressure (gRPC
    flow control then holds the proxy). After a request that needs no answer, the next is read
    once pilot's writes in flight end (`wave`, see `pilot.xds.writewave`: the ACKs of a push
    wait for its fan-out). A vanished client ends the stream quietly.
    """
    try:
        while (wire := await read()) is not grpc.aio.EOF:
            answer = session.handle_wire(wire)
            del wire  # not kept while waiting for the next request
            if answer:
                stream.dirty = True
                stream.wake.set()
            elif wave is not None and wave.holding:
                await wave.hold()
    except (grpc.aio.AioRpcError, grpc.aio.BaseError):  # the client left, or pilot is stopping
        pass
    except Exception as exc:
        log.exception("handling an ADS request failed")
        stream.error = exc
    stream.closed = True
    stream.wake.set()


class PodStreams:
    """Open streams by the Pod their node id names (namespace, name).

    Only when classification reads Pods (`enabled`, set with the Kubernetes registry): a local
    mesh keeps no copy of each Node. Cost per followed stream: a copy of its Node and a set entry.
    """

    def __init__(self) -> None:
        self.enabled = False
        self._by_pod: dict[tuple[str, str], set[StreamSignals]] = {}

    def follow(self, node_id: str, node: Any, stream: StreamSignals) -> tuple[str, str] | None:
        """Follow `stream` if its node id names a Pod (keeping a copy of `node` to classify again);
        returns the Pod to pass to `leave`, or None when the stream is not followed."""
        pod = pod_of_node(node_id) if self.enabled else None
        if pod is not None:
            stream.node = type(node)()
            stream.node.CopyFrom(node)
            self._by_pod.setdefault(pod, set()).add(stream)
        return pod

    def leave(self, pod: tuple[str, str] | None, stream: StreamSignals) -> None:
        """The stream ended: stop following it."""
        if pod is None:
            return
        following = self._by_pod[pod]
        following.discard(stream)
        if not following:
            del self._by_pod[pod]

    def changed(self, namespace: str, name: str) -> None:
        """A Pod's labels changed: its streams classify their Node again at their next step. Cost: a
        dictionary lookup; the streams do the rest."""
        for stream in self._by_pod.get((namespace, name), ()):
            stream.reclassify = True
            stream.wake.set()
