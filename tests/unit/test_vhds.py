"""Virtual hosts over VHDS (`pilot.translate.vhds`): the split loses nothing, a route edit changes
the edited virtual host alone, only Envoys that take VHDS over ADS get it, and a delta stream
sends a virtual host's removal with the updates that replace it."""

from __future__ import annotations

from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from prometheus_client import CollectorRegistry

from pilot.model.build import build_mesh
from pilot.model.proxy import ProxyClass, ProxyIdentity, ProxyKind, takes_vhds_over_ads
from pilot.translate import generate_parts
from pilot.translate.encoded import as_message
from pilot.translate.vhds import merged_json, vhost_display_name
from pilot.xds.cache import SnapshotCache
from pilot.xds.delta import DeltaSession
from pilot.xds.server import AdsServer
from pilot.xds.snapshot import Snapshot
from pilot.xds.status import StatusRegistry, XdsMetrics
from pilot.xds.typeurls import ROUTE, VIRTUAL_HOST
from tests.unit.test_route_fast_path import CLASSES, Pipeline, objects

WHOLE = [k for k in CLASSES if k.kind == ProxyKind.SIDECAR and not k.vhds]


def _whole_and_split(key: ProxyClass) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    mesh = build_mesh(objects())
    whole = {n: as_message(c) for n, c in generate_parts(mesh, key)[ROUTE][0].items()}
    parts = generate_parts(mesh, ProxyClass(key.kind, key.namespace, key.labels, captured=key.captured, vhds=True))
    bases = {n: as_message(c) for n, c in parts[ROUTE][0].items()}
    hosts = {n: as_message(v) for n, v in parts[VIRTUAL_HOST][0].items()}
    return whole, bases, hosts


def test_the_split_keeps_every_virtual_host_once_and_names_vhds() -> None:
    for key in WHOLE:
        whole, bases, hosts = _whole_and_split(key)
        assert bases.keys() == whole.keys(), key.describe()
        for name, config in whole.items():
            base = bases[name]
            assert base.vhds.config_source.HasField("ads"), name
            assert base.max_direct_response_body_size_bytes.value == 1024 * 1024
            own = [v for v in config.virtual_hosts if "*" in v.domains]
            assert list(base.virtual_hosts) == own  # the catch-all stays, as it was
            taken = {n.split("/", 1)[1]: v for n, v in hosts.items() if n.startswith(f"{name}/")}
            assert all(v.name == f"{name}/{short}" for short, v in taken.items())  # Envoy removes by that name
            for vhost in config.virtual_hosts:
                if "*" in vhost.domains:
                    continue
                renamed = route_components_pb2.VirtualHost()
                renamed.CopyFrom(taken.pop(vhost.name))
                renamed.name = vhost.name
                assert renamed == vhost, vhost.name
            assert not taken, sorted(taken)  # nothing made up
        # Other fields of the configuration stay in the base (a captured port's host matching).
        for name, config in whole.items():
            assert bases[name].ignore_port_in_host_matching == config.ignore_port_in_host_matching


def test_a_route_edit_changes_the_edited_virtual_host_alone() -> None:
    """Through the fast path, as pilot pushes: the base configuration keeps its version, and of
    the virtual hosts only web's is new; the others are the very resources sent before."""
    pipeline = Pipeline(fast=True)
    plain = next(k for k in CLASSES if k.vhds and not k.captured)
    captured = next(k for k in CLASSES if k.vhds and k.captured)
    before = pipeline.push(objects())
    after = pipeline.push(objects(web_weight=70))
    for key in (plain, captured):
        assert after[key].of(ROUTE).version == before[key].of(ROUTE).version, key.describe()
        old, new = before[key].of(VIRTUAL_HOST), after[key].of(VIRTUAL_HOST)
        changed = new.changes_from(old, old.version)
        assert [n.rsplit("/", 1)[1] for n in changed] == ["web.shop.svc.cluster.local:8080"], sorted(changed)
        assert all(new[n] is old[n] for n in new if n not in changed)
        assert not new.gone_from(old)
    assert plain not in pipeline.generated  # the route fast path served it


def _node(agent: str = "envoy", major: int = 1, minor: int = 40) -> Any:
    node = discovery_pb2.DiscoveryRequest().node
    node.user_agent_name = agent
    node.user_agent_build_version.version.major_number = major
    node.user_agent_build_version.version.minor_number = minor
    return node


def test_only_an_envoy_that_takes_vhds_over_ads_is_served_it() -> None:
    assert takes_vhds_over_ads(_node())
    assert takes_vhds_over_ads(_node(minor=41)) and takes_vhds_over_ads(_node(major=2, minor=0))
    assert takes_vhds_over_ads(_node(minor=37))  # the first release that takes it
    assert not takes_vhds_over_ads(_node(minor=36))  # refuses `ads` as VHDS's config source
    assert not takes_vhds_over_ads(_node(agent="grpc"))
    assert not takes_vhds_over_ads(base_pb2.Node(id="sidecar~1"))  # no release reported


def _vhost(name: str, domains: list[str], cluster: str) -> Any:
    return route_components_pb2.VirtualHost(name=name, domains=domains, routes=[route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix="/"), route=route_components_pb2.RouteAction(cluster=cluster))])


def test_a_delta_stream_removes_a_virtual_host_in_the_response_that_replaces_it() -> None:
    """A domain moving from one virtual host to another: held twice, Envoy would refuse the update
    (domains are unique in a configuration), so the removal travels with the new virtual host."""
    registry = StatusRegistry(XdsMetrics(CollectorRegistry()))
    key = ProxyClass(ProxyKind.SIDECAR, "shop", vhds=True)
    session = DeltaSession(registry.open(ProxyIdentity("p", "c", key), "delta", "test"), registry)
    first = Snapshot.from_resources({VIRTUAL_HOST: {
        "outbound/a:80": _vhost("outbound/a:80", ["a", "shared"], "ca"),
        "outbound/b:80": _vhost("outbound/b:80", ["b"], "cb")}})
    session.handle_wire(discovery_pb2.DeltaDiscoveryRequest(type_url=VIRTUAL_HOST).SerializeToString())  # wildcard
    (raw,) = session.responses(first)
    sent = discovery_pb2.DeltaDiscoveryResponse.FromString(raw)
    assert sorted(r.name for r in sent.resources) == ["outbound/a:80", "outbound/b:80"]
    session.handle_wire(discovery_pb2.DeltaDiscoveryRequest(type_url=VIRTUAL_HOST,
                                                            response_nonce=sent.nonce).SerializeToString())
    moved = Snapshot.from_resources({VIRTUAL_HOST: {
        "outbound/b:80": _vhost("outbound/b:80", ["b", "shared"], "cb"),
        "outbound/c:80": _vhost("outbound/c:80", ["c"], "cc")}})
    (raw,) = session.responses(moved)
    update = discovery_pb2.DeltaDiscoveryResponse.FromString(raw)
    assert sorted(r.name for r in update.resources) == ["outbound/b:80", "outbound/c:80"]
    assert list(update.removed_resources) == ["outbound/a:80"]


def test_tools_see_the_configuration_as_envoy_merges_it() -> None:
    base = {"name": "outbound", "vhds": {"configSource": {"ads": {}}},
            "virtualHosts": [{"name": "allow_any", "domains": ["*"]}]}
    plain = {"name": "inbound", "virtualHosts": []}
    merged = merged_json({"outbound": base, "inbound": plain}, [
        {"@type": route_pb2.RouteConfiguration.DESCRIPTOR.full_name, "name": "outbound/a:80", "domains": ["a"]},
        {"name": "inbound/x", "domains": ["x"]}])  # a configuration without VHDS takes none
    assert [v["name"] for v in merged["outbound"]["virtualHosts"]] == ["allow_any", "outbound/a:80"]
    assert "@type" not in merged["outbound"]["virtualHosts"][1]
    assert merged["inbound"]["virtualHosts"] == [] and base["virtualHosts"] == [{"name": "allow_any", "domains": ["*"]}]
    assert vhost_display_name(base, {"name": "outbound/a:80"}) == "a:80"
    assert vhost_display_name(plain, {"name": "inbound/x"}) == "inbound/x"


def test_the_server_marks_delta_sidecars_of_envoy_1_37_on_unless_turned_off() -> None:
    """`AdsServer._served_as`: a delta sidecar stream from Envoy 1.40 (or 1.37) is served as a VHDS class; a
    SotW stream, a gateway, an older Envoy, and any stream with `vhds=False`
    (`MESHCTL_PILOT_VHDS=false`) keep their class."""
    def served(protocol: str, kind: ProxyKind = ProxyKind.SIDECAR, node: Any = None, on: bool = True) -> bool:
        status = StatusRegistry(XdsMetrics(CollectorRegistry()))
        server = AdsServer(SnapshotCache(), status, vhds=on)
        identity = ProxyIdentity("p", "c", ProxyClass(kind, "shop"))
        found = server._served_as(identity, _node() if node is None else node, protocol)
        assert found.node_id == "p" and found.proxy_class.namespace == "shop"
        return found.proxy_class.vhds

    assert served("delta")
    assert not served("sotw")
    assert not served("delta", ProxyKind.ROUTER)
    assert served("delta", node=_node(minor=37))
    assert not served("delta", node=_node(minor=36))
    assert not served("delta", on=False)
