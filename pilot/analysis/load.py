"""Turning YAML files, cluster listings or pilot's /debug/configz into an `AnalysisInput`.

Mesh documents go through `pilot.api.parse_object`, the parser pilot's file and Kubernetes
sources use, and files are split into documents by pilot's own splitter
(`pilot.config.yaml_text.documents`: ``---`` lines, libyaml when present, the same size limit and
numbering), so what analyze accepts is what pilot accepts. A document
that does not parse becomes a message (IST0106 per bad field, MSH0001 for YAML that is not an
object), never an exception. Kubernetes kinds the analyzers need (Service, Pod, Namespace, Secret,
and the pod templates of Deployments, StatefulSets, DaemonSets, ReplicaSets and Jobs) are read
as decoded data; any other non-Istio kind is ignored, as ``istioctl analyze`` ignores it.

Cost: one YAML parse and one validation per document; nothing is kept but the parsed objects.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pilot.analysis import messages as msg
from pilot.analysis.inputs import AnalysisInput, Key, WorkloadFacts
from pilot.api import ApiObject, parse_object
from pilot.api.errors import ApiError, InvalidObjectError, UnsupportedKindError
from pilot.config.yaml_dir import yaml_files
from pilot.config.yaml_text import documents
from pilot.credentials import CA_FILES, CERT_FILES
from pilot.kube.registry import RegistryError, kube_service

TEMPLATE_KINDS = frozenset({"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"})
SIDECAR_CONTAINER = "istio-proxy"
INJECT_KEY = "sidecar.istio.io/inject"  # a pod's label (or, older, annotation) opting in or out
_FIX_SCHEMA = "correct the field as the message says, then apply the object again"


class LoadError(Exception):
    """A path cannot be read at all (not a document problem: those become messages)."""


@dataclass
class Collector:
    """Accumulates documents from any source; `result` freezes them into an `AnalysisInput`."""

    objects: dict[Key, ApiObject] = field(default_factory=dict)
    origins: dict[Key, str] = field(default_factory=dict)
    services: dict[tuple[str, str], Mapping[str, Any]] = field(default_factory=dict)
    workloads: list[WorkloadFacts] = field(default_factory=list)
    namespaces: dict[str, Mapping[str, str]] = field(default_factory=dict)
    secrets: set[tuple[str, str, str]] | None = None
    problems: list[msg.Message] = field(default_factory=list)
    workloads_known: bool = False
    kubernetes: bool = False  # Kubernetes objects were seen: the config is a cluster's

    def add(self, doc: object, origin: str) -> None:
        """Classify and keep one decoded document."""
        if not isinstance(doc, Mapping):
            self._invalid(origin, f"a document must be a mapping, not {type(doc).__name__}")
            return
        api_version, kind = str(doc.get("apiVersion") or ""), str(doc.get("kind") or "")
        if kind == "List" and isinstance(doc.get("items"), list):
            for i, item in enumerate(doc["items"]):
                self.add(item, f"{origin}.items[{i}]")
            return
        group = api_version.rpartition("/")[0]
        if group.endswith("istio.io") or not api_version or not kind:
            self._mesh_object(doc, origin)
        else:
            self._kube_object(doc, group, kind, origin)

    def _mesh_object(self, doc: Mapping[str, Any], origin: str) -> None:
        try:
            obj = parse_object(doc)
        except InvalidObjectError as exc:
            ns, name = exc.namespace or "", exc.name or ""
            for issue in exc.issues:
                self.problems.append(msg.Message(msg.SCHEMA_VALIDATION_ERROR, exc.kind or "", ns, name, issue.path,
                                                 f"Schema validation error: {issue.message}", _FIX_SCHEMA, origin))
            return
        except UnsupportedKindError as exc:
            self.problems.append(msg.Message(
                msg.UNSUPPORTED_KIND, exc.kind or "", exc.namespace or "", exc.name or "", "apiVersion",
                f"{doc.get('apiVersion')} {exc.kind} is not served by meshctl, so pilot ignores it",
                "remove it, or use a kind meshctl serves (see the README's Supported Istio API)", origin))
            return
        except ApiError as exc:
            self._invalid(origin, exc.reason, exc.kind, exc.namespace, exc.name)
            return
        if obj.key in self.objects:
            first = self.origins.get(obj.key, "")
            self.problems.append(msg.Message(
                msg.DUPLICATE_OBJECT, *obj.key, "metadata.name", f"already defined at {first}; this one is ignored",
                "rename one of the two, or delete the copy", origin))
            return
        self.objects[obj.key] = obj
        self.origins[obj.key] = origin

    def _invalid(self, origin: str, reason: str, kind: str | None = None, namespace: str | None = None,
                 name: str | None = None) -> None:
        self.problems.append(msg.Message(msg.INVALID_DOCUMENT, kind or "", namespace or "", name or "", "",
                                         reason, "give every document apiVersion, kind and metadata.name",
                                         origin))

    def _kube_object(self, doc: Mapping[str, Any], group: str, kind: str, origin: str) -> None:
        meta = doc.get("metadata") or {}
        if not isinstance(meta, Mapping):
            self._invalid(origin, "metadata must be a map", kind)
            return
        name, namespace = str(meta.get("name") or ""), str(meta.get("namespace") or "default")
        self.kubernetes = True
        try:
            self._kube_kind(doc, group, kind, origin, meta, name, namespace)
        except (RegistryError, AttributeError, TypeError, ValueError) as exc:
            self.problems.append(msg.Message(msg.SCHEMA_VALIDATION_ERROR, kind, namespace, name, "",
                                             f"Schema validation error: {exc}",
                                             f"correct the {kind} so Kubernetes accepts it", origin))

    def _kube_kind(self, doc: Mapping[str, Any], group: str, kind: str, origin: str, meta: Mapping[str, Any],
                   name: str, namespace: str) -> None:
        if group == "" and kind == "Service":
            service = {**doc, "metadata": {**meta, "namespace": namespace}}
            kube_service(service)  # refuses what pilot's registry would refuse (RegistryError)
            if not all(isinstance(p, Mapping) for p in (service.get("spec") or {}).get("ports") or ()):
                raise ValueError("spec.ports must be a list of maps")
            self.services[(namespace, name)] = service
            self.origins[("Service", namespace, name)] = origin
        elif group == "" and kind == "Namespace":
            self.namespaces[name] = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
            self.origins[("Namespace", "", name)] = origin
        elif group == "" and kind == "Secret":
            data = doc.get("data") or doc.get("stringData") or {}
            if not isinstance(data, Mapping):
                raise ValueError("data must be a map")
            self.add_secret(namespace, name, data)
        elif group == "" and kind == "Pod":
            self.workloads.append(workload_facts("Pod", namespace, name, meta, doc.get("spec") or {}))
            self.origins[("Pod", namespace, name)] = origin
            self.workloads_known = True
        elif kind in TEMPLATE_KINDS:
            template = (doc.get("spec") or {}).get("template") or {}
            if not isinstance(template, Mapping):
                raise ValueError("spec.template must be a map")
            self.workloads.append(workload_facts(kind, namespace, name, template.get("metadata") or {},
                                                 template.get("spec") or {}))
            self.workloads_known = True

    def add_secret(self, namespace: str, name: str, data: Mapping[str, Any]) -> None:
        found = self.secrets if self.secrets is not None else set()
        if any(k in data for k in CERT_FILES):
            found.add((namespace, name, "cert"))
        if any(k in data for k in CA_FILES):
            found.add((namespace, name, "ca"))
        self.secrets = found

    def result(self, cluster_domain: str = "cluster.local", root_namespace: str = "istio-system") -> AnalysisInput:
        known = self.workloads_known or any(k[0] == "WorkloadEntry" for k in self.objects)
        return AnalysisInput(
            objects=tuple(self.objects[k] for k in sorted(self.objects)),
            origins=dict(self.origins),
            services=tuple(self.services[k] for k in sorted(self.services)),
            workloads=tuple(sorted(self.workloads, key=lambda w: (w.namespace, w.kind, w.name))),
            namespaces=dict(sorted(self.namespaces.items())),
            secrets=frozenset(self.secrets) if self.secrets is not None else None,
            problems=tuple(self.problems),
            workloads_known=known,
            kubernetes=self.kubernetes,
            cluster_domain=cluster_domain,
            root_namespace=root_namespace,
        )


def workload_facts(kind: str, namespace: str, name: str, meta: Mapping[str, Any],
                   spec: Mapping[str, Any]) -> WorkloadFacts:
    """A Pod (or pod template): labels, service account, and whether it runs a sidecar."""
    if not isinstance(meta, Mapping) or not isinstance(spec, Mapping):
        raise ValueError("the pod's metadata and spec must be maps")
    labels = {str(k): str(v) for k, v in sorted((meta.get("labels") or {}).items())}
    containers = [c.get("name") for key in ("containers", "initContainers") for c in spec.get(key) or ()
                  if isinstance(c, Mapping)]
    inject = str(labels.get(INJECT_KEY, (meta.get("annotations") or {}).get(INJECT_KEY, "")))
    account = str(spec.get("serviceAccountName") or spec.get("serviceAccount") or "default")
    return WorkloadFacts(kind, namespace, name, labels, account, SIDECAR_CONTAINER in containers,
                         inject.lower() == "false" or bool(spec.get("hostNetwork")))


def add_text(collector: Collector, text: str, file: str) -> None:
    """Every document of one YAML file; a document that is not YAML costs only itself."""
    for found in documents(text):
        where = f"{file}[{found.index}]"
        if found.too_large:
            collector.problems.append(msg.Message(msg.INVALID_DOCUMENT, "", "", "", "", (
                "document is over the 1.5 MiB limit of a Kubernetes object"), "split it into smaller objects", where))
        elif found.invalid:
            problem = f"invalid YAML: {found.invalid}"
            collector.problems.append(msg.Message(msg.INVALID_DOCUMENT, "", "", "", "", problem,
                                                  "fix the YAML syntax at the line shown", where))
        else:
            collector.add(found.value, where)


def add_paths(collector: Collector, paths: Iterable[str], stdin_text: str | None = None) -> None:
    """Files and directories (every ``*.yaml``/``*.yml`` under them, as pilot reads a directory);
    ``-`` is `stdin_text`. Raises `LoadError` for a path that does not exist or cannot be read."""
    for given in paths:
        if given == "-":
            add_text(collector, stdin_text or "", "<stdin>")
            continue
        path = Path(given)
        if path.is_dir():
            for file in yaml_files(path):
                add_text(collector, _read(file), str(file))
        elif path.exists():
            add_text(collector, _read(path), str(path))
        else:
            raise LoadError(f"{given}: no such file or directory")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LoadError(f"{path}: cannot read: {exc}") from None


def from_documents(docs: Iterable[tuple[object, str]], **kwargs: Any) -> AnalysisInput:
    """An input from decoded documents, each with its origin (tests, configz, cluster listings)."""
    collector = Collector()
    for doc, origin in docs:
        collector.add(doc, origin)
    return collector.result(**kwargs)


def from_configz(body: Mapping[str, Any]) -> Collector:
    """The objects pilot serves, from its ``/debug/configz`` (each entry's ``object``), and the
    documents it rejected (IST0106, with pilot's own words: it keeps serving the previous version)."""
    collector = Collector()
    for entry in body.get("objects") or ():
        if isinstance(entry, Mapping) and isinstance(entry.get("object"), Mapping):
            collector.add(entry["object"], f"pilot:{entry.get('source', '')}")
    for entry in body.get("rejected") or ():
        if isinstance(entry, Mapping):
            origin = f"pilot:{entry.get('source', '')}:{entry.get('file', '')}[{entry.get('index', 0)}]"
            collector.problems.append(msg.Message(
                msg.SCHEMA_VALIDATION_ERROR, str(entry.get("kind") or ""), str(entry.get("namespace") or ""),
                str(entry.get("name") or ""), "", f"Schema validation error: pilot rejected it: {entry.get('message')}",
                _FIX_SCHEMA, origin))
    return collector
