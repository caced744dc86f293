"""`pilot.translate.prepare`: which classes a full push generates in its build thread, and that
doing so leaves publishing nothing of what they share to make again."""

from __future__ import annotations

from pathlib import Path

from pilot.config.yaml_dir import load_dir
from pilot.model.build import build_mesh
from pilot.model.proxy import ProxyClass, ProxyKind
from pilot.translate import generate_parts
from pilot.translate.prepare import prepare_shared, representatives
from pilot.xds.typeurls import CLUSTER, ENDPOINT, ROUTE

CANARY = Path(__file__).resolve().parents[2] / "examples" / "canary"


def test_one_class_per_kind_namespace_certificates_and_capture() -> None:
    mesh = build_mesh(list(load_dir(CANARY).objects))
    a = ProxyClass(ProxyKind.SIDECAR, "default", (("app", "a"),))
    b = ProxyClass(ProxyKind.SIDECAR, "default", (("app", "b"),))  # a's view: not generated again
    tls = ProxyClass(ProxyKind.SIDECAR, "default", (("app", "a"),), mtls=True)
    other = ProxyClass(ProxyKind.SIDECAR, "other", (("app", "a"),))
    router = ProxyClass(ProxyKind.ROUTER, "default", (("istio", "ingressgateway"),))
    assert representatives(mesh, [a, b, tls, other, router, b]) == [a, tls, other, router]


def test_with_none_connected_a_sidecar_of_the_first_workload_and_none_without_workloads() -> None:
    mesh = build_mesh(list(load_dir(CANARY).objects))
    first = min(mesh.workloads.values(), key=lambda w: (w.namespace, w.name))
    (picked,) = representatives(mesh, [])
    assert picked == ProxyClass(ProxyKind.SIDECAR, first.namespace, tuple(sorted(first.labels.items())))
    assert representatives(build_mesh([]), []) == []


def test_what_a_prepared_class_shares_is_the_very_object_publishing_finds() -> None:
    mesh = build_mesh(list(load_dir(CANARY).objects))
    (picked,) = representatives(mesh, [])
    assert prepare_shared(mesh, []) == 1
    prepared = generate_parts(mesh, picked)
    another = ProxyClass(ProxyKind.SIDECAR, picked.namespace, (("app", "someone-else"),))
    published = generate_parts(mesh, another)
    for type_url in (CLUSTER, ENDPOINT, ROUTE):  # parts shared by the view (listeners are the class's own)
        assert published[type_url][0] is prepared[type_url][0], type_url  # made once, by the preparation
