from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from pilot.model.proxy import ProxyClass, identity_from_node
from pilot.testing.ads_client import AdsClient, make_node
from pilot.xds.cache import SnapshotCache
from pilot.xds.server import AdsServer
from pilot.xds.snapshot import Snapshot
from pilot.xds.status import StatusRegistry, XdsMetrics


@dataclass
class Harness:
    cache: SnapshotCache
    status: StatusRegistry
    target: str
    node: Any

    @property
    def key(self) -> ProxyClass:
        return identity_from_node(self.node).proxy_class

    def publish(self, snap: Snapshot) -> None:
        self.cache.set(self.key, snap)

    def client(self, delta: bool = False, node: Any = None) -> AdsClient:
        return AdsClient(self.target, node or self.node, delta=delta)

    def status_of(self, type_name: str) -> dict[str, Any]:
        rows = self.status.syncz()
        assert rows, "no stream in status"
        return dict(rows[0]["types"][type_name])


@pytest.fixture
async def ads() -> AsyncIterator[Harness]:
    cache = SnapshotCache()
    status = StatusRegistry(XdsMetrics(CollectorRegistry()))
    server = AdsServer(cache, status)
    port = await server.start("127.0.0.1", 0)
    node = make_node("sidecar~127.0.0.2~app.default~default.svc.cluster.local", labels={"app": "a"})
    try:
        yield Harness(cache, status, f"127.0.0.1:{port}", node)
    finally:
        await server.stop(0)
