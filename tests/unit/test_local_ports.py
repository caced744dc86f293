"""Local-mesh port clashes are reported as mesh warnings naming the services and the port."""

from __future__ import annotations

from typing import Any

from pilot.api import ApiObject, parse_object
from pilot.model.build import build_mesh


def se(name: str, *ports: tuple[int, str], app: str | None = None) -> ApiObject:
    spec: dict[str, Any] = {
        "hosts": [f"{name}.default.svc.cluster.local"],
        "resolution": "STATIC",
        "ports": [{"number": n, "name": f"p{n}-{proto.lower()}", "protocol": proto} for n, proto in ports],
    }
    spec["workloadSelector"] = {"labels": {"app": app or name}}
    return parse_object({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
                         "metadata": {"name": name, "namespace": "default"}, "spec": spec})


def we(name: str, app: str, address: str) -> ApiObject:
    return parse_object({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
                         "metadata": {"name": name, "namespace": "default"},
                         "spec": {"address": address, "labels": {"app": app}}})


def warnings(*objects: ApiObject) -> list[str]:
    return list(build_mesh(objects).warnings)


def test_two_tcp_services_on_one_port_name_both_and_the_one_that_is_reachable() -> None:
    (warning,) = warnings(se("pg-b", (5432, "TCP")), se("pg-a", (5432, "TCP")))
    assert warning.startswith("port 5432: TCP pg-a.default.svc.cluster.local (ServiceEntry default/pg-a), "
                              "pg-b.default.svc.cluster.local (ServiceEntry default/pg-b) share it")
    assert warning.endswith("so only pg-a.default.svc.cluster.local is reachable on it")


def test_tls_services_share_a_port_by_sni_but_tcp_among_them_is_unreachable() -> None:
    assert warnings(se("a", (443, "TLS")), se("b", (443, "HTTPS"))) == []
    (warning,) = warnings(se("a", (443, "TLS")), se("raw", (443, "TCP")))
    assert "TCP raw.default.svc.cluster.local" in warning and "TLS a.default.svc.cluster.local" in warning
    assert "routes that port by SNI" in warning


def test_http_ports_never_clash_and_one_service_per_port_is_quiet() -> None:
    assert warnings(se("a", (8080, "HTTP")), se("b", (8080, "HTTP")), se("c", (5432, "TCP"))) == []


def test_a_workload_serving_a_tcp_port_cannot_reach_another_service_on_it() -> None:
    objects = [se("pg", (5432, "TCP"), app="pg"), se("other", (5432, "TCP"), app="other"),
               we("pg-1", "pg", "127.0.5.1"), we("other-1", "other", "127.0.5.2")]
    found = [w for w in warnings(*objects) if w.startswith("WorkloadEntry")]
    assert found == [
        "WorkloadEntry default/other-1 serves port 5432, so its sidecar has no outbound listener there: "
        "pg.default.svc.cluster.local (ServiceEntry default/pg) not reachable from it on that port",
        "WorkloadEntry default/pg-1 serves port 5432, so its sidecar has no outbound listener there: "
        "other.default.svc.cluster.local (ServiceEntry default/other) not reachable from it on that port",
    ]


def test_a_workload_serving_its_own_services_port_is_not_a_clash() -> None:
    assert warnings(se("pg", (5432, "TCP"), app="pg"), we("pg-1", "pg", "127.0.5.1")) == []
