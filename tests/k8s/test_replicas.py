"""Two pilot replicas (`meshctl up --kubeconfig`) serve one cluster side by side; a real Envoy whose
pilot is killed reconnects to the other and is SYNCED there with the same config versions, no NACK."""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from envoy.config.endpoint.v3 import endpoint_components_pb2

import meshctl.envoy
from meshctl.envoy import EnvoyProcess
from pilot.bootstrap import XDS_CLUSTER, BootstrapSpec, sidecar_bootstrap
from tests.k8s.cluster import KubeCluster
from tests.k8s.pilots import UpProcess, get_json, install_crds, no_namespace_terminating, until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

HEADER = "x-meshctl-replica"


@pytest.fixture
def namespace(kube_cluster: KubeCluster) -> Iterator[str]:
    install_crds(kube_cluster)
    ns = f"replicas-{secrets.token_hex(4)}"
    kube_cluster.kubectl("create", "namespace", ns)
    yield ns
    kube_cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def with_second_pilot(port: int) -> Callable[[BootstrapSpec], Any]:
    """`sidecar_bootstrap` whose xDS cluster also lists a second pilot on 127.0.0.1:`port` (one
    cluster, two endpoints: Envoy's ADS stream goes to either and moves when it breaks)."""
    def bootstrap(spec: BootstrapSpec) -> Any:
        made = sidecar_bootstrap(spec)
        xds = next(c for c in made.static_resources.clusters if c.name == XDS_CLUSTER)
        second = endpoint_components_pb2.LbEndpoint()
        second.CopyFrom(xds.load_assignment.endpoints[0].lb_endpoints[0])
        second.endpoint.address.socket_address.port_value = port
        xds.load_assignment.endpoints[0].lb_endpoints.append(second)
        return made
    return bootstrap


async def _row(debug: str, node_id: str) -> dict[str, Any] | None:
    rows = await get_json(f"http://{debug}/debug/syncz")
    return next((r for r in rows or () if r["proxy"] == node_id), None)


def _routes(dump: Any) -> dict[str, Any]:
    """Route configuration name -> (version, content) in an Envoy config dump (update times left out)."""
    found = [c for c in dump.get("configs", ()) if "route_config" in c]  # `?resource=`: one entry per config
    return {c["route_config"]["name"]: (c.get("version_info"), c["route_config"]) for c in found}


# What a delta sidecar of Envoy 1.40 holds once synced: its row lists a type only from the proxy's
# first request of it, so a row of CDS alone (a stream just opened) is SYNCED but not the config.
SIDECAR_TYPES = frozenset({"CDS", "EDS", "LDS", "RDS", "VHDS"})


def _synced(row: dict[str, Any] | None) -> bool:
    return (row is not None and row["types"].keys() >= SIDECAR_TYPES
            and all(t["state"] == "SYNCED" for t in row["types"].values()))


async def test_a_proxy_whose_pilot_dies_reconnects_to_the_other_replica_and_stays_synced(
        kube_cluster: KubeCluster, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ns = namespace
    # The versions compared below are of the whole mesh: wait out earlier tests' namespace deletions.
    await until("namespaces of earlier tests gone", lambda: no_namespace_terminating(kube_cluster), 120)
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "reviews", "namespace": ns},
               "spec": {"selector": {"app": "reviews"}, "ports": [{"name": "http", "port": 9080}]}}
    await asyncio.to_thread(kube_cluster.kubectl, "apply", "-f", "-", stdin=json.dumps(service))
    route = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
             "metadata": {"name": "reviews", "namespace": ns},
             "spec": {"hosts": ["reviews"], "http": [
                 {"match": [{"headers": {HEADER: {"exact": ns}}}], "route": [{"destination": {"host": "reviews"}}]},
                 {"route": [{"destination": {"host": "reviews"}}]}]}}
    await asyncio.to_thread(kube_cluster.kubectl, "apply", "-f", "-", stdin=json.dumps(route))

    a, b = (UpProcess(kube_cluster, ns, tmp_path / f"pilot-{n}.log") for n in "ab")
    try:
        await asyncio.gather(a.start(), b.start())
        spec = BootstrapSpec(namespace=ns, workload="client", address=f"127.0.{random.randint(100, 200)}.1",
                             pilot_port=int(a.ads.rpartition(":")[2]))
        monkeypatch.setattr(meshctl.envoy, "sidecar_bootstrap", with_second_pilot(int(b.ads.rpartition(":")[2])))
        async with EnvoyProcess(spec) as envoy:
            async def synced_somewhere() -> bool:
                return any([_synced(await _row(p.debug, spec.node_id)) for p in (a, b)])
            await until("Envoy SYNCED at one of the pilots", synced_somewhere)
            first, second = (a, b) if _synced(await _row(a.debug, spec.node_id)) else (b, a)
            before = await _row(first.debug, spec.node_id)
            assert before is not None and await _row(second.debug, spec.node_id) is None
            routes = _routes(await envoy.config_dump("dynamic_route_configs"))
            assert HEADER in json.dumps(routes), "the kubectl-applied route is not in Envoy"

            await first.stop(signal.SIGKILL)

            async def synced_at_second() -> bool:
                return _synced(await _row(second.debug, spec.node_id))
            await until("Envoy SYNCED at the other pilot after its pilot was killed", synced_at_second, 120)
            after = await _row(second.debug, spec.node_id)
            assert after is not None
            # Versions are content hashes: both replicas give the same config the same versions.
            assert {t: v["acked_version"] for t, v in after["types"].items()} == \
                   {t: v["acked_version"] for t, v in before["types"].items()}
            assert all(v["nacks"] == 0 for v in after["types"].values()), after
            stats = await envoy.stats(r"update_rejected|control_plane\.connected_state")
            assert stats["control_plane.connected_state"] == 1
            assert {k: v for k, v in stats.items() if k.endswith("update_rejected") and v} == {}
            assert _routes(await envoy.config_dump("dynamic_route_configs")) == routes
    finally:
        await asyncio.gather(a.stop(signal.SIGKILL), b.stop(signal.SIGKILL))
