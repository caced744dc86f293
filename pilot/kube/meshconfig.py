"""The mesh config map: Istio's `istio` ConfigMap (key `mesh`) in the control-plane namespace.

Only the fields pilot uses are modelled; every other MeshConfig field is accepted and ignored
(Istio's MeshConfig has dozens). `parse_mesh_config` is pure; `MeshConfigHandler` is the
`WatchHandler` for that one ConfigMap: a new valid version replaces the current one and calls
`on_change`; an invalid one is logged with its field and reason and the last good version stays
(as a rejected file keeps its objects); a deleted ConfigMap means Istio's defaults.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

log = logging.getLogger(__name__)

CONFIGMAP_NAME = "istio"
CONFIGMAP_KEY = "mesh"
DEFAULT_NAMESPACE = "istio-system"


class _Model(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)


class SelectorRequirement(_Model):
    """One `matchExpressions` entry of a Kubernetes label selector."""

    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: tuple[str, ...] = ()

    @pydantic.model_validator(mode="after")
    def _values_fit_operator(self) -> SelectorRequirement:
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"operator {self.operator} needs values")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"operator {self.operator} takes no values")
        return self

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        inside = self.key in labels and labels[self.key] in self.values
        return inside if self.operator == "In" else not inside


class NamespaceSelector(_Model):
    """A Kubernetes label selector (`matchLabels` and `matchExpressions`, all must hold).

    An empty selector matches every namespace, as Kubernetes' `labels.Everything()`.
    """

    match_labels: dict[str, str] = Field(default_factory=dict)
    match_expressions: tuple[SelectorRequirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return (all(labels.get(k) == v for k, v in self.match_labels.items())
                and all(req.matches(labels) for req in self.match_expressions))


class ProxyDefaults(_Model):
    """`defaultConfig`: the ProxyConfig every sidecar starts from. Only `proxyMetadata` is read (the
    injector sets each entry as a variable of the sidecar, e.g. `ISTIO_DELTA_XDS: "false"` mesh-wide;
    a pod's `proxy.istio.io/config` annotation overrides it per key). Values are strings, as in Istio."""

    proxy_metadata: dict[str, pydantic.StrictStr] = Field(default_factory=dict)

    @pydantic.field_validator("proxy_metadata")
    @classmethod
    def _names_are_variables(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [name for name in value if not name or "=" in name]
        if bad:
            raise ValueError(f"{bad[0]!r} is not an environment variable name")
        return value


class MeshConfig(_Model):
    """The MeshConfig fields pilot reads, with Istio's defaults."""

    trust_domain: str = "cluster.local"
    root_namespace: str = DEFAULT_NAMESPACE
    # None (or empty): every namespace is part of the mesh.
    discovery_selectors: tuple[NamespaceSelector, ...] = ()
    default_config: ProxyDefaults = Field(default_factory=ProxyDefaults)


class MeshConfigError(ValueError):
    """The mesh config is not valid: names the field and the reason."""


def parse_mesh_config(text: str, *, where: str = "mesh config",
                      root_namespace: str = DEFAULT_NAMESPACE) -> MeshConfig:
    """The MeshConfig in `text` (YAML); unset fields take their defaults.

    `root_namespace` is the default rootNamespace: Istio's is the control plane's namespace.
    """
    try:
        doc = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise MeshConfigError(f"{where}: invalid YAML: {' '.join(str(exc).split())}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise MeshConfigError(f"{where}: must be a map of fields, not {type(doc).__name__}")
    doc = {k: v for k, v in doc.items() if v is not None}
    doc.setdefault("rootNamespace", root_namespace)
    try:
        return MeshConfig.model_validate(doc)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(top)'}: {err['msg']}" for err in exc.errors())
        raise MeshConfigError(f"{where}: {problems}") from None


class MeshConfigHandler:
    """`WatchHandler` of the mesh ConfigMap (watched by name): keeps `current` up to date."""

    def __init__(self, on_change: Callable[[MeshConfig], None], *, namespace: str = DEFAULT_NAMESPACE,
                 name: str = CONFIGMAP_NAME, key: str = CONFIGMAP_KEY) -> None:
        self.on_change = on_change
        self.namespace, self.name, self.key = namespace, name, key
        self.current = MeshConfig(root_namespace=namespace)
        self.error: str | None = None  # why the latest version was rejected, if it was

    def replace(self, objects: list[dict[str, Any]]) -> None:
        mine = [o for o in objects if (o.get("metadata") or {}).get("name") == self.name]
        if mine:
            self.upsert(mine[0])
        else:
            self._set(MeshConfig(root_namespace=self.namespace))

    def upsert(self, obj: dict[str, Any]) -> None:
        text = (obj.get("data") or {}).get(self.key, "")
        where = f"ConfigMap {self.namespace}/{self.name} key {self.key}"
        try:
            config = parse_mesh_config(text, where=where, root_namespace=self.namespace)
        except MeshConfigError as exc:
            self.error = str(exc)
            log.error("rejected %s; the previous mesh config stays", exc)
            return
        self._set(config)

    def delete(self, obj: dict[str, Any]) -> None:
        self._set(MeshConfig(root_namespace=self.namespace))

    def _set(self, config: MeshConfig) -> None:
        self.error = None
        if config != self.current:
            self.current = config
            self.on_change(config)
