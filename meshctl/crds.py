"""The CustomResourceDefinitions of every mesh kind meshctl serves, as Kubernetes objects.

Names, short names, categories and printer columns are Istio's, so ``kubectl get vs``,
``kubectl get istio-io`` and the columns users know keep working. Every version Istio serves
is served with one schema (the models accept all of them alike); ``v1`` is stored, so objects
written through ``v1beta1`` or ``v1alpha3`` are stored as ``v1`` without conversion (the schemas
are identical, Kubernetes' ``None`` conversion strategy only rewrites ``apiVersion``).

Pure: ``crds()`` depends only on the API models; ``manifests/crds.yaml`` is its committed output.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pilot.api.base import ApiObject
from pilot.api.crd_schema import crd_schema
from pilot.api.parse import GROUP as NETWORKING_GROUP
from pilot.api.parse import KINDS as NETWORKING_KINDS
from pilot.api.parse import VERSIONS as NETWORKING_VERSIONS
from pilot.api.security_kinds import SECURITY_GROUP, SECURITY_KINDS, SECURITY_VERSIONS

Manifest = dict[str, Any]
STORED_VERSION = "v1"
_AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


@dataclass(frozen=True)
class KindNames:
    """What Istio calls a kind on the command line: plural, short names and extra printer columns."""

    plural: str
    short_names: tuple[str, ...] = ()
    columns: tuple[tuple[str, str], ...] = ()  # (column name, JSONPath), shown before Age
    columns_after_age: tuple[tuple[str, str], ...] = ()


# Istio's facts (manifests/charts/base/files/crd-all.gen.yaml).
NAMES: Mapping[str, KindNames] = {
    "DestinationRule": KindNames("destinationrules", ("dr",), (("Host", ".spec.host"),)),
    "Gateway": KindNames("gateways", ("gw",)),
    "ServiceEntry": KindNames("serviceentries", ("se",), (
        ("Hosts", ".spec.hosts"), ("Location", ".spec.location"), ("Resolution", ".spec.resolution"))),
    "Sidecar": KindNames("sidecars"),
    "VirtualService": KindNames("virtualservices", ("vs",), (
        ("Gateways", ".spec.gateways"), ("Hosts", ".spec.hosts"))),
    "WorkloadEntry": KindNames("workloadentries", ("we",), columns_after_age=(("Address", ".spec.address"),)),
    "AuthorizationPolicy": KindNames("authorizationpolicies", ("ap",), (("Action", ".spec.action"),)),
    "PeerAuthentication": KindNames("peerauthentications", ("pa",), (("Mode", ".spec.mtls.mode"),)),
    "RequestAuthentication": KindNames("requestauthentications", ("ra",)),
}


def served_kinds() -> list[tuple[str, str, tuple[str, ...], type[ApiObject]]]:
    """(group, kind, versions, model) of every kind, sorted by group and kind."""
    rows = [(NETWORKING_GROUP, k, tuple(NETWORKING_VERSIONS), m) for k, m in NETWORKING_KINDS.items()]
    rows += [(SECURITY_GROUP, k, tuple(SECURITY_VERSIONS), m) for k, m in SECURITY_KINDS.items()]
    return sorted(rows, key=lambda row: (row[0], row[1]))


def crd_name(group: str, kind: str) -> str:
    """``virtualservices.networking.istio.io``: the CRD's object name."""
    return f"{NAMES[kind].plural}.{group}"


def crds() -> list[Manifest]:
    """One CRD per served kind (sorted by name), every version served, v1 stored, status a subresource."""
    return sorted((_crd(group, kind, versions, model) for group, kind, versions, model in served_kinds()),
                  key=lambda crd: str(crd["metadata"]["name"]))


def _crd(group: str, kind: str, versions: tuple[str, ...], model: type[ApiObject]) -> Manifest:
    names = NAMES[kind]
    group_category = group.replace(".", "-")  # networking-istio-io, security-istio-io
    name_block: Manifest = {"kind": kind, "listKind": f"{kind}List", "plural": names.plural,
                            "singular": kind.lower(), "categories": ["istio-io", group_category]}
    if names.short_names:
        name_block["shortNames"] = list(names.short_names)
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": crd_name(group, kind), "labels": {"app.kubernetes.io/part-of": "meshctl"}},
        "spec": {
            "group": group,
            "names": name_block,
            "scope": "Namespaced",
            "versions": [_version(v, model, names) for v in _ordered(versions)],
        },
    }


def _ordered(versions: tuple[str, ...]) -> list[str]:
    """The stored version first, then the others in Istio's order (alphabetical)."""
    return [STORED_VERSION, *sorted(v for v in versions if v != STORED_VERSION)]


def _version(version: str, model: type[ApiObject], names: KindNames) -> Manifest:
    out: Manifest = {"name": version, "served": True, "storage": version == STORED_VERSION}
    columns = [*_columns(names.columns), _AGE, *_columns(names.columns_after_age)]
    if len(columns) > 1:
        out["additionalPrinterColumns"] = [dict(c) for c in columns]
    out["schema"] = {"openAPIV3Schema": crd_schema(model)}
    out["subresources"] = {"status": {}}
    return out


def _columns(pairs: tuple[tuple[str, str], ...]) -> list[Manifest]:
    return [{"name": name, "type": "string", "jsonPath": path} for name, path in pairs]
