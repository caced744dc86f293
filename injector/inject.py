"""The pure core of sidecar injection: `decide` whether a pod gets a sidecar, `inject` it.

`inject(pod, settings, namespace_labels)` returns a new pod dict (the input is never changed):
the `istio-init` init container first (so every later container's traffic is captured), the
`istio-proxy` sidecar last, their volumes, probes rewritten through the agent, the
`security.istio.io/tlsMode` and canonical-service labels, and the `sidecar.istio.io/status`
annotation that marks the pod as injected. A pod that must not be injected comes back as an equal
copy, so injecting twice is a no-op. The webhook diffs the two into a JSONPatch; `meshctl
kube-inject` writes the result out; both share this one function (and its golden files).

Enrolment follows Istio: a namespace labeled `istio-injection=enabled`, or `istio.io/rev=<this
revision>` without an `istio-injection` label, is injected by default; the pod's
`sidecar.istio.io/inject` label (which wins) or annotation says `true`/`false` to override; a
namespace labeled `istio-injection=disabled` or of another revision is never injected; nor are
hostNetwork pods (their rules would change the node's network) or `kube-system`/`kube-public`.
Cost: a deep copy of the pod plus microseconds of dict building; no I/O.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from injector import annotations as ann
from injector.annotations import InjectionError, pod_ref
from injector.containers import INIT_CONTAINER, PROXY_CONTAINER, init_container, proxy_container, proxy_env, volumes
from injector.probes import rewrite_probes
from injector.settings import STATUS_PORT, InjectSettings

__all__ = ["ENROLLED", "Decision", "InjectionError", "decide", "inject", "workload_name"]

# Namespace labels that enrol a namespace: what `meshctl kube-inject` assumes (it cannot see the
# namespace), and the webhook when the API server's namespaceSelector already did the check.
ENROLLED: Mapping[str, str] = {ann.NAMESPACE_INJECTION: "enabled"}


@dataclass(frozen=True)
class Decision:
    """Whether to inject, and why (for logs, the webhook's audit annotation and tests)."""

    inject: bool
    reason: str


def _meta(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = pod.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def is_injected(pod: Mapping[str, Any]) -> bool:
    """Already has a sidecar: an `istio-proxy` container or the `sidecar.istio.io/status` annotation."""
    spec = pod.get("spec") or {}
    names = {c.get("name") for key in ("containers", "initContainers") for c in spec.get(key) or ()}
    return PROXY_CONTAINER in names or ann.STATUS in (_meta(pod).get("annotations") or {})


def _pod_choice(pod: Mapping[str, Any]) -> tuple[str | None, str]:
    """The pod's own `sidecar.istio.io/inject` ("true"/"false"/None) and where it came from."""
    labels: Mapping[str, str] = _meta(pod).get("labels") or {}
    notes: Mapping[str, str] = _meta(pod).get("annotations") or {}
    where, value = ("label", labels[ann.INJECT]) if ann.INJECT in labels else ("annotation", notes.get(ann.INJECT))
    return (value if value in ("true", "false") else None), where


def decide(pod: Mapping[str, Any], settings: InjectSettings, namespace_labels: Mapping[str, str]) -> Decision:
    """Whether `pod` gets a sidecar, given its namespace's labels (see the module docstring)."""
    if (pod.get("spec") or {}).get("hostNetwork"):
        return Decision(False, "hostNetwork pod: its redirect rules would change the node's network")
    if is_injected(pod):
        return Decision(False, "already injected")
    namespace = _meta(pod).get("namespace") or "default"
    if namespace in settings.ignored_namespaces:
        return Decision(False, f"namespace {namespace} is never injected")
    injection = namespace_labels.get(ann.NAMESPACE_INJECTION)
    revision = namespace_labels.get(ann.REVISION)
    if injection == "disabled":
        return Decision(False, f"namespace {namespace} is labeled {ann.NAMESPACE_INJECTION}=disabled")
    if injection is None and revision is not None and revision != settings.revision:
        return Decision(False, f"namespace {namespace} belongs to revision {revision}, not {settings.revision}")
    choice, where = _pod_choice(pod)
    if choice is not None:
        return Decision(choice == "true", f"pod {where} {ann.INJECT}={choice}")
    if injection == "enabled":
        return Decision(True, f"namespace {namespace} is labeled {ann.NAMESPACE_INJECTION}=enabled")
    if revision is not None:
        return Decision(True, f"namespace {namespace} is labeled {ann.REVISION}={revision}")
    return Decision(False, f"namespace {namespace} is not enrolled")


def workload_name(pod: Mapping[str, Any]) -> str:
    """The workload a pod belongs to: its controller's name (a Deployment's for a ReplicaSet pod)."""
    meta = _meta(pod)
    for owner in meta.get("ownerReferences") or ():
        if owner.get("controller") and owner.get("name"):
            name = str(owner["name"])
            suffix = (meta.get("labels") or {}).get("pod-template-hash")
            if owner.get("kind") == "ReplicaSet" and suffix and name.endswith(f"-{suffix}"):
                return name[: -len(suffix) - 1]
            return name
    if meta.get("name"):
        return str(meta["name"])
    return str(meta.get("generateName") or "unknown").rstrip("-") or "unknown"


def _rewrite_enabled(pod: Mapping[str, Any], settings: InjectSettings) -> bool:
    value = str((_meta(pod).get("annotations") or {}).get(ann.REWRITE_PROBES, "")).lower()
    return {"true": True, "false": False}.get(value, settings.rewrite_app_probes)


def _add_metadata(out: dict[str, Any], settings: InjectSettings, workload: str, apps: list[str]) -> None:
    meta = out.setdefault("metadata", {})
    labels = meta.setdefault("labels", {})
    labels.setdefault(ann.TLS_MODE, "istio")
    labels.setdefault("service.istio.io/canonical-name",
                      labels.get("app.kubernetes.io/name") or labels.get("app") or workload)
    labels.setdefault("service.istio.io/canonical-revision",
                      labels.get("app.kubernetes.io/version") or labels.get("version") or "latest")
    notes = meta.setdefault("annotations", {})
    if apps:
        notes.setdefault("kubectl.kubernetes.io/default-container", apps[0])
        notes.setdefault("kubectl.kubernetes.io/default-logs-container", apps[0])
    status = {"containers": [PROXY_CONTAINER], "initContainers": [INIT_CONTAINER],
              "revision": settings.revision, "volumes": [str(v["name"]) for v in volumes(settings)]}
    notes[ann.STATUS] = json.dumps(status, sort_keys=True, separators=(",", ":"))


def inject(pod: dict[str, Any], settings: InjectSettings, namespace_labels: Mapping[str, str], *,
           workload: str | None = None, mesh_metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`pod` with a sidecar when `decide` says so, else an equal copy; InjectionError for a bad annotation.

    `workload` names the controller when the caller knows it (kube-inject of a Deployment);
    otherwise it comes from the pod's owner references (`workload_name`). `mesh_metadata`: the
    mesh config's `defaultConfig.proxyMetadata` (see `injector.containers.proxy_env`).
    """
    out = copy.deepcopy(pod)
    if not decide(pod, settings, namespace_labels).inject:
        return out
    options = ann.traffic(pod)
    port = ann.status_port(pod, STATUS_PORT)
    spec = out.setdefault("spec", {})
    containers: list[dict[str, Any]] = spec.setdefault("containers", [])
    if not containers:
        raise InjectionError(f"{pod_ref(pod)}: spec.containers: a pod needs at least one container")
    taken = {v.get("name") for v in spec.get("volumes") or ()} & {v["name"] for v in volumes(settings)}
    if taken:
        raise InjectionError(f"{pod_ref(pod)}: spec.volumes: {', '.join(sorted(map(str, taken)))} "
                             "already defined; the sidecar needs these names")
    probers: dict[str, Any] = {}
    if _rewrite_enabled(pod, settings):
        probers = rewrite_probes(containers, port, lambda p: ann.captures_inbound(options, p))
    name = workload or workload_name(pod)
    apps = [str(c.get("name")) for c in containers]
    env = proxy_env(pod, settings, name, port, probers, mesh_metadata)
    spec["initContainers"] = [init_container(pod, settings, options, port), *(spec.get("initContainers") or [])]
    containers.append(proxy_container(pod, settings, env))
    spec["volumes"] = [*(spec.get("volumes") or []), *volumes(settings)]
    _add_metadata(out, settings, name, apps)
    return out
