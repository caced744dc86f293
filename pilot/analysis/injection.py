"""Sidecar injection checks, as Istio's: namespaces not enrolled, and pods of enrolled namespaces
running without their sidecar (created before the namespace was labelled, or the webhook was down)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from pilot.analysis import messages as msg
from pilot.analysis.context import Context

INJECTION_LABEL = "istio-injection"
REVISION_LABEL = "istio.io/rev"
DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"  # "ambient": no sidecars wanted
SYSTEM_NAMESPACES = ("istio-system", "kube-system", "kube-public", "kube-node-lease", "local-path-storage")


def _system(namespace: str) -> bool:
    return namespace in SYSTEM_NAMESPACES


def enrolled(labels: Mapping[str, str]) -> bool:
    """Whether pods of a namespace with `labels` get a sidecar (Istio's rule: ``istio-injection=enabled``,
    or an ``istio.io/rev`` label without ``istio-injection``)."""
    value = labels.get(INJECTION_LABEL)
    return value == "enabled" or (value is None and REVISION_LABEL in labels)


def namespace_not_injected(ctx: Context) -> Iterator[msg.Message]:
    """IST0102: a namespace with neither injection label (its new pods get no sidecar)."""
    for namespace, labels in ctx.inp.namespaces.items():
        if _system(namespace) or labels.get(DATAPLANE_MODE_LABEL) == "ambient":
            continue
        if INJECTION_LABEL not in labels and REVISION_LABEL not in labels:
            yield msg.Message(msg.NAMESPACE_NOT_INJECTED, "Namespace", namespace, namespace, "metadata.labels",
                              "The namespace is not enabled for Istio injection",
                              f"run 'kubectl label namespace {namespace} istio-injection=enabled' to enable it, or "
                              f"'kubectl label namespace {namespace} istio-injection=disabled' to mark it as not "
                              "needing injection", ctx.inp.origins.get(("Namespace", "", namespace), ""))


def pod_missing_proxy(ctx: Context) -> Iterator[msg.Message]:
    """IST0103: a pod of an enrolled namespace without its istio-proxy container."""
    for pod in ctx.inp.workloads:
        labels = ctx.inp.namespaces.get(pod.namespace)
        if pod.kind != "Pod" or labels is None or not enrolled(labels) or pod.opted_out or pod.has_sidecar:
            continue
        yield msg.Message(msg.POD_MISSING_PROXY, "Pod", pod.namespace, pod.name, "spec.containers",
                          f"The pod {pod.namespace}/{pod.name} is missing the Istio proxy",
                          "restart or redeploy the workload so the injection webhook adds the sidecar",
                          ctx.inp.origins.get(("Pod", pod.namespace, pod.name), ""))
