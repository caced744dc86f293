"""Parsing Istio YAML into typed objects: defaults, aliases, versions, errors, warnings."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import yaml

from pilot.api import (
    ApiError,
    DestinationRule,
    InvalidObjectError,
    Location,
    MalformedDocumentError,
    Resolution,
    ServiceEntry,
    UnsupportedKindError,
    VirtualService,
    WorkloadEntry,
    parse_object,
)


def doc(kind: str, spec: dict[str, Any], name: str = "x", version: str = "v1", **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"networking.istio.io/{version}",
        "kind": kind,
        "metadata": {"name": name, **meta},
        "spec": spec,
    }


SE_SPEC = {"hosts": ["reviews.default.svc.cluster.local"], "ports": [{"number": 9080, "name": "http"}]}


@pytest.mark.parametrize("version", ["v1", "v1beta1", "v1alpha3"])
def test_all_served_versions_share_one_schema(version: str) -> None:
    obj = parse_object(doc("ServiceEntry", SE_SPEC, version=version))
    assert isinstance(obj, ServiceEntry)
    assert obj.spec.ports[0].number == 9080


def test_istio_defaults() -> None:
    se = parse_object(doc("ServiceEntry", SE_SPEC))
    assert isinstance(se, ServiceEntry)
    assert se.spec.location == Location.MESH_EXTERNAL
    assert se.spec.resolution == Resolution.NONE
    assert se.metadata.namespace == "default"
    we = parse_object(doc("WorkloadEntry", {"address": "127.0.0.5"}))
    assert isinstance(we, WorkloadEntry)
    assert we.spec.weight == 1
    zero = parse_object(doc("WorkloadEntry", {"address": "127.0.0.5", "weight": 0}))
    assert isinstance(zero, WorkloadEntry) and zero.spec.weight == 1


def test_camel_case_yaml_parses_unchanged() -> None:
    text = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: bookinfo}
spec:
  host: reviews
  trafficPolicy:
    connectionPool:
      tcp: {connectTimeout: 250ms, maxConnections: 7}
      http: {http1MaxPendingRequests: 3}
    outlierDetection: {consecutive5xxErrors: 5, interval: 1m30s}
  subsets:
  - name: v1
    labels: {version: v1}
"""
    dr = parse_object(yaml.safe_load(text))
    assert isinstance(dr, DestinationRule)
    policy = dr.spec.traffic_policy
    assert policy is not None and policy.connection_pool is not None
    assert policy.connection_pool.tcp is not None
    assert policy.connection_pool.tcp.connect_timeout == timedelta(milliseconds=250)
    assert policy.outlier_detection is not None
    assert policy.outlier_detection.consecutive_5xx_errors == 5
    assert policy.outlier_detection.interval == timedelta(seconds=90)
    assert dr.warnings == ()
    assert dr.to_dict()["spec"]["trafficPolicy"]["connectionPool"]["tcp"]["connectTimeout"] == "0.25s"


def test_weight_error_names_kind_object_path_and_reason() -> None:
    spec = {
        "hosts": ["reviews"],
        "http": [
            {
                "route": [
                    {"destination": {"host": "reviews", "subset": "v1"}, "weight": 80},
                    {"destination": {"host": "reviews", "subset": "v2"}, "weight": -120},
                ]
            }
        ],
    }
    with pytest.raises(InvalidObjectError) as info:
        parse_object(doc("VirtualService", spec, name="reviews"))
    assert str(info.value) == (
        "VirtualService default/reviews: spec.http[0].route[1].weight: must be between 0 and 2147483647"
    )
    assert info.value.issues[0].path == "spec.http[0].route[1].weight"


def test_every_field_problem_is_reported_at_once() -> None:
    spec = {
        "hosts": ["a.b"],
        "ports": [{"number": 0, "name": "http"}, {"number": 80, "name": "x", "protocol": "bogus"}],
    }
    with pytest.raises(InvalidObjectError) as info:
        parse_object(doc("ServiceEntry", spec, namespace="shop"))
    paths = [i.path for i in info.value.issues]
    assert paths == ["spec.ports[0].number", "spec.ports[1].protocol"]
    assert "ServiceEntry shop/x:" in str(info.value)


@pytest.mark.parametrize(
    ("kind", "spec", "path", "reason"),
    [
        ("ServiceEntry", {"hosts": [], "ports": []}, "spec.hosts", "at least one host"),
        ("ServiceEntry", {**SE_SPEC, "resolution": "STATIC"}, "spec.resolution", "needs endpoints"),
        (
            "ServiceEntry",
            {**SE_SPEC, "workloadSelector": {"labels": {"a": "b"}}, "endpoints": [{"address": "1.2.3.4"}]},
            "spec",
            "only one of workloadSelector or endpoints",
        ),
        (
            "ServiceEntry",
            {**SE_SPEC, "endpoints": [{"address": "1.2.3.4", "ports": {"web": 80}}]},
            "spec.endpoints[0].ports.web",
            "names no port",
        ),
        ("ServiceEntry", {**SE_SPEC, "hosts": ["Bad_Host"]}, "spec.hosts[0]", "not a valid lowercase host"),
        ("WorkloadEntry", {}, "spec.address", "required unless network"),
        (
            "DestinationRule",
            {"host": "r", "subsets": [{"name": "v1"}, {"name": "v1"}]},
            "spec.subsets[1].name",
            "duplicate subset",
        ),
        (
            "DestinationRule",
            {"host": "r", "trafficPolicy": {"connectionPool": {"tcp": {"connectTimeout": "soon"}}}},
            "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
            "not a duration",
        ),
        ("VirtualService", {"hosts": ["r"], "http": [{}]}, "spec.http[0]", "exactly one of route"),
        (
            "VirtualService",
            {
                "hosts": ["r"],
                "http": [
                    {"match": [{"uri": {"exact": "/", "prefix": "/"}}], "route": [{"destination": {"host": "r"}}]}
                ],
            },
            "spec.http[0].match[0].uri",
            "exactly one of exact, prefix, regex",
        ),
        (
            "Sidecar",
            {"ingress": [{"port": {"number": 80}, "defaultEndpoint": "10.0.0.1:80"}]},
            "spec.ingress[0].defaultEndpoint",
            "must be 127.0.0.1:PORT",
        ),
        ("Gateway", {"servers": [{"port": {"number": 80}}]}, "spec.servers[0].hosts", "at least one host"),
    ],
)
def test_istio_rules(kind: str, spec: dict[str, Any], path: str, reason: str) -> None:
    with pytest.raises(InvalidObjectError) as info:
        parse_object(doc(kind, spec))
    assert any(i.path == path and reason in i.message for i in info.value.issues), info.value.issues


def test_unknown_fields_warn_with_paths_and_keep_the_object() -> None:
    spec = {**SE_SPEC, "hostz": ["typo"], "ports": [{"number": 80, "name": "http", "protocl": "HTTP"}]}
    obj = parse_object(doc("ServiceEntry", spec))
    assert [(w.path, w.message) for w in obj.warnings] == [
        ("spec.hostz", "unknown field, ignored"),
        ("spec.ports[0].protocl", "unknown field, ignored"),
    ]


def test_kubernetes_metadata_does_not_warn() -> None:
    obj = parse_object(
        doc(
            "ServiceEntry",
            SE_SPEC,
            uid="u",
            resourceVersion="7",
            managedFields=[{}],
            creationTimestamp="2024-01-01T00:00:00Z",
        )
    )
    assert obj.warnings == ()
    assert obj.metadata.resource_version == "7"


def test_weights_of_several_destinations_are_relative_but_not_all_zero() -> None:
    route = [{"destination": {"host": "r", "subset": s}, "weight": 0} for s in ("a", "b")]
    with pytest.raises(InvalidObjectError) as info:
        parse_object(doc("VirtualService", {"hosts": ["r"], "http": [{"route": route}]}))
    assert [(i.path, i.message) for i in info.value.issues] == [
        ("spec.http[0].route", "total destination weight = 0: several destinations need a weight above 0")
    ]
    # Istio 1.15 on: 30 and 30 are an even split (no sum of 100 needed).
    route = [{"destination": {"host": "r", "subset": s}, "weight": 30} for s in ("a", "b")]
    assert parse_object(doc("VirtualService", {"hosts": ["r"], "http": [{"route": route}]})).warnings == ()
    # A lone destination may omit its weight.
    obj = parse_object(doc("VirtualService", {"hosts": ["r"], "http": [{"route": route[:1]}]}))
    assert isinstance(obj, VirtualService) and obj.warnings == ()


@pytest.mark.parametrize(
    ("document", "error", "text"),
    [
        ([1, 2], MalformedDocumentError, "must be a mapping"),
        ({"kind": "ServiceEntry", "metadata": {"name": "a"}}, MalformedDocumentError, "apiVersion and kind"),
        (
            {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {}},
            MalformedDocumentError,
            "metadata.name",
        ),
        ({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}}, UnsupportedKindError, "not served"),
        (
            {"apiVersion": "networking.istio.io/v2", "kind": "ServiceEntry", "metadata": {"name": "a"}},
            UnsupportedKindError,
            "not served",
        ),
    ],
)
def test_malformed_documents(document: object, error: type[ApiError], text: str) -> None:
    with pytest.raises(error, match=text):
        parse_object(document)


def test_objects_are_frozen() -> None:
    obj = parse_object(doc("ServiceEntry", SE_SPEC))
    with pytest.raises(Exception, match="frozen"):
        obj.spec.hosts = ()  # type: ignore[attr-defined]
