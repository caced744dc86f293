"""Targeted checks of the local-mesh data-plane convention (the goldens show the whole output)."""

from __future__ import annotations

from typing import Any

from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

from pilot.api import ApiObject, parse_object
from pilot.model.build import build_mesh
from pilot.model.mesh import MeshSnapshot
from pilot.model.proxy import ProxyClass, ProxyKind
from pilot.translate import generate
from pilot.xds import typeurls
from pilot.xds.snapshot import Snapshot


def obj(kind: str, name: str, spec: dict[str, Any], namespace: str = "default") -> ApiObject:
    meta = {"name": name, "namespace": namespace}
    return parse_object({"apiVersion": "networking.istio.io/v1", "kind": kind, "metadata": meta, "spec": spec})


def service(host: str, ports: list[tuple[int, str]], namespace: str = "default") -> ApiObject:
    spec = {
        "hosts": [host],
        "resolution": "STATIC",
        "ports": [{"number": n, "name": name} for n, name in ports],
        "workloadSelector": {"labels": {"app": host.split(".", maxsplit=1)[0]}},
    }
    return obj("ServiceEntry", host.split(".", maxsplit=1)[0], spec, namespace)


def sidecar(namespace: str = "default", bind: str | None = "127.0.0.10", workload: str | None = "me") -> ProxyClass:
    return ProxyClass(ProxyKind.SIDECAR, namespace, bind_address=bind, workload=workload)


def domains(mesh: MeshSnapshot, proxy: ProxyClass) -> dict[str, list[str]]:
    routes = generate(mesh, proxy)[typeurls.ROUTE]["outbound"]
    return {vh.name: list(vh.domains) for vh in routes.virtual_hosts}


def test_short_forms_depend_on_namespace_and_bare_host_on_lowest_port() -> None:
    mesh = build_mesh([service("reviews.default.svc.cluster.local", [(9080, "http"), (80, "http-web")])])
    same = domains(mesh, sidecar("default"))
    assert same["reviews.default.svc.cluster.local:80"] == sorted(
        f"{h}{p}"
        for h in ("reviews", "reviews.default", "reviews.default.svc", "reviews.default.svc.cluster.local",
                  "reviews.default.svc.cluster.local.")  # the absolute name (Istio 1.27 on)
        for p in ("", ":80")
    )
    assert "reviews" not in same["reviews.default.svc.cluster.local:9080"]
    assert "reviews.default.svc.cluster.local." not in same["reviews.default.svc.cluster.local:9080"]
    assert "reviews.default.svc.cluster.local.:9080" in same["reviews.default.svc.cluster.local:9080"]
    assert "reviews:9080" in same["reviews.default.svc.cluster.local:9080"]
    other = domains(mesh, sidecar("shop"))
    assert "reviews:80" not in other["reviews.default.svc.cluster.local:80"]
    assert "reviews.default:80" in other["reviews.default.svc.cluster.local:80"]


def test_a_short_form_never_steals_a_real_host() -> None:
    mesh = build_mesh(
        [service("reviews.default.svc.cluster.local", [(80, "http")]), service("reviews.default", [(80, "http")])]
    )
    got = domains(mesh, sidecar())
    assert "reviews.default:80" in got["reviews.default:80"]
    assert "reviews.default:80" not in got["reviews.default.svc.cluster.local:80"]
    all_domains = [d for ds in got.values() for d in ds]
    assert len(all_domains) == len(set(all_domains)), "Envoy rejects duplicate domains"


def test_bind_address_or_wildcard() -> None:
    wl = obj("WorkloadEntry", "me", {"address": "127.0.0.10", "labels": {"app": "reviews"}, "ports": {"http": 7000}})
    mesh = build_mesh([service("reviews.default.svc.cluster.local", [(9080, "http")]), wl])
    local = generate(mesh, sidecar())
    assert sorted(local[typeurls.LISTENER]) == ["127.0.0.10_15001", "127.0.0.10_7000"]
    app = local[typeurls.CLUSTER]["inbound|7000||"].load_assignment.endpoints[0].lb_endpoints[0]
    assert (app.endpoint.address.socket_address.address, app.endpoint.address.socket_address.port_value) == (
        "127.0.0.1",
        7000,
    )
    k8s = generate(mesh, ProxyClass(ProxyKind.SIDECAR, "default", labels=(("app", "reviews"),)))
    # No WorkloadEntry to say otherwise: the service port is the workload port.
    assert sorted(k8s[typeurls.LISTENER]) == ["0.0.0.0_15001", "0.0.0.0_9080"]


def test_outbound_listener_uses_rds_and_router() -> None:
    listener = generate(build_mesh([]), sidecar())[typeurls.LISTENER]["127.0.0.10_15001"]
    hcm = hcm_pb2.HttpConnectionManager()
    assert listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    assert (hcm.stat_prefix, hcm.rds.route_config_name) == ("outbound", "outbound")
    # CORS and fault injection act per route, so they sit before the router on every outbound chain;
    # the dynamic forward proxy resolves hosts for PassthroughCluster (ALLOW_ANY) just before it.
    assert [f.name for f in hcm.http_filters] == [
        "envoy.filters.http.cors", "envoy.filters.http.fault", "envoy.filters.http.dynamic_forward_proxy",
        "envoy.filters.http.router",
    ]
    assert hcm.http_filters[-1].typed_config.type_url.endswith("envoy.extensions.filters.http.router.v3.Router")


def hcm_of(listener: Any) -> Any:
    hcm = hcm_pb2.HttpConnectionManager()
    assert listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    return hcm


def test_the_outbound_listener_trusts_only_the_apps_beside_it_with_envoy_control_headers() -> None:
    """Envoy keeps x-envoy-upstream-rq-timeout-ms / x-envoy-max-retries only from internal senders:
    loopback for a local-mesh sidecar, also private ranges for a Kubernetes-style one (its outbound
    port only gets the pod's own traffic)."""
    mesh = build_mesh([])
    local = hcm_of(generate(mesh, sidecar())[typeurls.LISTENER]["127.0.0.10_15001"])
    k8s = hcm_of(generate(mesh, sidecar(bind=None, workload=None))[typeurls.LISTENER]["0.0.0.0_15001"])
    for hcm in (local, k8s):
        assert hcm.use_remote_address.value is True
    def ranges(hcm: Any) -> list[tuple[str, int]]:
        return [(r.address_prefix, r.prefix_len.value) for r in hcm.internal_address_config.cidr_ranges]

    assert ranges(local) == [("127.0.0.0", 8), ("::1", 128)]
    assert ranges(k8s) == [
        ("127.0.0.0", 8), ("::1", 128), ("10.0.0.0", 8), ("172.16.0.0", 12), ("192.168.0.0", 16), ("fc00::", 7)
    ]  # fmt: skip


def test_every_http_connection_manager_gets_istios_settings() -> None:
    wl = obj("WorkloadEntry", "me", {"address": "127.0.0.10", "labels": {"app": "reviews"}, "ports": {"http": 7000}})
    mesh = build_mesh([service("reviews.default.svc.cluster.local", [(9080, "http")]), wl])
    listeners = generate(mesh, sidecar())[typeurls.LISTENER]
    inbound = hcm_of(listeners["127.0.0.10_7000"])
    for hcm in (hcm_of(listeners["127.0.0.10_15001"]), inbound):
        assert hcm.HasField("stream_idle_timeout") and hcm.stream_idle_timeout.ToSeconds() == 0  # Envoy: 5 min
        assert hcm.normalize_path.value is True
        assert hcm.path_with_escaped_slashes_action == hcm_pb2.HttpConnectionManager.KEEP_UNCHANGED
        assert [u.upgrade_type for u in hcm.upgrade_configs] == ["websocket"]
    assert not inbound.use_remote_address.value  # inbound: the caller's sidecar set X-Forwarded-For


def test_inbound_routes_resend_requests_reset_before_the_app_saw_them_except_on_grpc_ports() -> None:
    spec = {
        "hosts": ["ratings.default.svc.cluster.local"], "resolution": "STATIC",
        "ports": [{"number": 9090, "name": "grpc", "protocol": "GRPC"}, {"number": 9091, "name": "http"}],
        "workloadSelector": {"labels": {"app": "ratings"}},
    }  # fmt: skip
    wl = obj("WorkloadEntry", "me", {"address": "127.0.0.10", "labels": {"app": "ratings"}})
    listeners = generate(build_mesh([obj("ServiceEntry", "ratings", spec), wl]), sidecar())[typeurls.LISTENER]
    routes = {port: hcm_of(listeners[f"127.0.0.10_{port}"]).route_config.virtual_hosts[0].routes[0].route
              for port in (9090, 9091)}  # fmt: skip
    assert not routes[9090].HasField("retry_policy")
    policy = routes[9091].retry_policy
    assert (policy.retry_on, policy.num_retries.value) == ("reset-before-request", 2)
    for action in routes.values():
        assert action.timeout.ToSeconds() == 0 and action.HasField("timeout")
        assert action.max_stream_duration.HasField("grpc_timeout_header_max")  # grpc-timeout honoured, no cap


def test_passthrough_is_for_local_mesh_sidecars_even_when_the_mesh_memo_is_shared() -> None:
    mesh = build_mesh([])
    local = generate(mesh, sidecar(workload=None))
    kubernetes_style = generate(mesh, sidecar(bind=None, workload=None))  # same namespace, same memo
    assert "PassthroughCluster" in local[typeurls.CLUSTER]
    assert "PassthroughCluster" not in kubernetes_style[typeurls.CLUSTER]
    assert [v.name for v in kubernetes_style[typeurls.ROUTE]["outbound"].virtual_hosts] == []


def test_empty_mesh_is_consistent() -> None:
    resources = generate(build_mesh([]), sidecar(workload=None))
    assert Snapshot.from_resources(resources).consistency_errors() == []
    assert list(resources[typeurls.ROUTE]) == ["outbound"]
    # Only ALLOW_ANY's catch-all: every host goes where DNS points.
    assert [v.name for v in resources[typeurls.ROUTE]["outbound"].virtual_hosts] == ["allow_any"]
    assert list(resources[typeurls.CLUSTER]) == ["PassthroughCluster"]


def test_uri_matches_and_port_specific_routes() -> None:
    vs = obj(
        "VirtualService",
        "r",
        {
            "hosts": ["reviews"],
            "http": [
                {"match": [{"uri": {"exact": "/x"}, "port": 9080}], "route": [{"destination": {"host": "reviews"}}]},
                {"match": [{"uri": {"regex": "/r.*"}}], "route": [{"destination": {"host": "reviews"}}]},
            ],
        },
    )
    mesh = build_mesh([service("reviews.default.svc.cluster.local", [(9080, "http"), (80, "http-web")]), vs])
    vhosts = {vh.name: vh for vh in generate(mesh, sidecar())[typeurls.ROUTE]["outbound"].virtual_hosts}
    on_9080 = vhosts["reviews.default.svc.cluster.local:9080"].routes
    assert [r.match.WhichOneof("path_specifier") for r in on_9080] == ["path", "safe_regex"]
    # No destination port and several service ports: the request's port picks the cluster.
    assert [r.route.cluster for r in on_9080] == ["outbound|9080||reviews.default.svc.cluster.local"] * 2
    on_80 = vhosts["reviews.default.svc.cluster.local:80"].routes
    assert [r.route.cluster for r in on_80] == ["outbound|80||reviews.default.svc.cluster.local"]


def test_dns_clusters_ask_for_ipv4_addresses_only_as_istio_does_for_ipv4_proxies() -> None:
    port = {"number": 443, "name": "tls", "protocol": "TLS"}
    spec = {"hosts": ["api.example.com"], "resolution": "DNS", "ports": [port]}
    clusters = generate(build_mesh([obj("ServiceEntry", "api", spec)]), sidecar())[typeurls.CLUSTER]
    cluster = clusters["outbound|443||api.example.com"]
    assert cluster.type == cluster.STRICT_DNS and cluster.dns_lookup_family == cluster.V4_ONLY
