"""What injection adds to a pod: the `istio-proxy` sidecar, the `istio-init` init container and
their volumes, as Kubernetes JSON dicts (Istio 1.30's names, ports, env names and defaults).

Pure builders: each takes the pod (read-only), the settings and what `inject` already worked out,
and returns fresh dicts, so the result is the same bytes for the same input (golden-testable).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from injector import annotations as ann
from injector.redirect import ALL, PROXY_INBOUND_PORTS, RedirectOptions, command_args, options_from_annotations
from injector.settings import HEALTH_PORT, PROMETHEUS_PORT, InjectSettings

PROXY_CONTAINER = "istio-proxy"
INIT_CONTAINER = "istio-init"

# Volumes (Istio's names) and where the sidecar mounts them.
WORKLOAD_SOCKET = "workload-socket"  # the agent's SDS socket, shared with Envoy
TOKEN = "istio-token"  # projected service-account token, audience istio-ca: the CSR credential
ENVOY = "istio-envoy"  # Envoy's bootstrap and scratch files (the root filesystem is read-only)
DATA = "istio-data"
PODINFO = "istio-podinfo"  # labels and annotations through the downward API
ROOT_CERT = "istiod-ca-cert"  # the mesh root (ConfigMap istio-ca-root-cert), to check the CA and pilot
MOUNTS = {
    WORKLOAD_SOCKET: "/var/run/secrets/workload-spiffe-uds",
    TOKEN: "/var/run/secrets/tokens",
    ENVOY: "/etc/istio/proxy",
    DATA: "/var/lib/istio/data",
    PODINFO: "/etc/istio/pod",
    ROOT_CERT: "/var/run/secrets/istio",
}


def _field_env(name: str, path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _env(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "value": value}


def _resources(notes: Mapping[str, str], settings: InjectSettings) -> dict[str, Any]:
    """Istio's rule: any proxyCPU/Memory(Limit) annotation replaces the defaults entirely."""
    keys = (ann.PROXY_CPU, ann.PROXY_MEMORY, ann.PROXY_CPU_LIMIT, ann.PROXY_MEMORY_LIMIT)
    if not any(k in notes for k in keys):
        return {"limits": {"cpu": settings.proxy_cpu_limit, "memory": settings.proxy_memory_limit},
                "requests": {"cpu": settings.proxy_cpu, "memory": settings.proxy_memory}}
    out: dict[str, Any] = {}
    for section, cpu, memory in (("requests", ann.PROXY_CPU, ann.PROXY_MEMORY),
                                 ("limits", ann.PROXY_CPU_LIMIT, ann.PROXY_MEMORY_LIMIT)):
        values = {r: notes[k] for r, k in (("cpu", cpu), ("memory", memory)) if k in notes}
        if values:
            out[section] = values
    return out


def _pod_ports(pod: Mapping[str, Any]) -> str:
    ports = [p for c in (pod.get("spec") or {}).get("containers") or () for p in c.get("ports") or ()]
    return json.dumps(ports, sort_keys=True, separators=(",", ":"))


def proxy_env(pod: Mapping[str, Any], settings: InjectSettings, workload: str, status_port: int,
              probers: Mapping[str, Any], mesh_metadata: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """The sidecar's environment: who the pod is (downward API), where the control plane is, mesh
    metadata, and `proxyMetadata`: the mesh config's `defaultConfig` (`mesh_metadata`), overridden
    per key by the pod's `proxy.istio.io/config` annotation, as Istio merges them."""
    spec = pod.get("spec") or {}
    apps = [str(c.get("name")) for c in spec.get("containers") or () if c.get("name") != PROXY_CONTAINER]
    metadata = {**(mesh_metadata or {}), **ann.proxy_metadata(pod)}
    proxy_config: dict[str, Any] = {"discoveryAddress": settings.discovery_address, "interceptionMode": "REDIRECT",
                                    "statusPort": status_port}
    if metadata:
        proxy_config["proxyMetadata"] = metadata
    env = [
        _env("CA_ADDR", settings.ca_address),
        _field_env("POD_NAME", "metadata.name"),
        _field_env("POD_NAMESPACE", "metadata.namespace"),
        _field_env("INSTANCE_IP", "status.podIP"),
        _field_env("SERVICE_ACCOUNT", "spec.serviceAccountName"),
        _field_env("HOST_IP", "status.hostIP"),
        _env("PROXY_CONFIG", json.dumps(proxy_config, sort_keys=True, separators=(",", ":"))),
        _env("TRUST_DOMAIN", settings.trust_domain),
        _env("ISTIO_META_POD_PORTS", _pod_ports(pod)),
        _env("ISTIO_META_APP_CONTAINERS", ",".join(apps)),
        _env("ISTIO_META_CLUSTER_ID", settings.cluster_id),
        _env("ISTIO_META_INTERCEPTION_MODE", "REDIRECT"),
        _env("ISTIO_META_WORKLOAD_NAME", workload),
        _env("ISTIO_META_MESH_ID", settings.trust_domain),
    ]
    if probers:
        env.append(_env("ISTIO_KUBE_APP_PROBERS", json.dumps(probers, sort_keys=True, separators=(",", ":"))))
    if metadata:  # as Istio: each proxyMetadata entry is a variable of the sidecar; it wins over ours
        env = [e for e in env if e["name"] not in metadata] + [_env(k, v) for k, v in metadata.items()]
    return env


def _health_probe(**timing: int) -> dict[str, Any]:
    return {"httpGet": {"path": "/healthz/ready", "port": HEALTH_PORT}, "timeoutSeconds": 3, **timing}


def proxy_container(pod: Mapping[str, Any], settings: InjectSettings, env: list[dict[str, Any]]) -> dict[str, Any]:
    """The `istio-proxy` container: agent + Envoy as UID 1337, read-only root, no capabilities."""
    notes: Mapping[str, str] = (pod.get("metadata") or {}).get("annotations") or {}
    return {
        "name": PROXY_CONTAINER,
        "image": settings.proxy_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": list(settings.proxy_command),
        "env": env,
        "ports": [{"containerPort": PROMETHEUS_PORT, "name": "http-envoy-prom", "protocol": "TCP"}],
        "readinessProbe": _health_probe(initialDelaySeconds=settings.readiness_initial_delay_seconds,
                                        periodSeconds=settings.readiness_period_seconds,
                                        failureThreshold=settings.readiness_failure_threshold),
        "startupProbe": _health_probe(initialDelaySeconds=0, periodSeconds=1,
                                      failureThreshold=settings.startup_failure_threshold),
        "resources": _resources(notes, settings),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "runAsGroup": settings.proxy_gid,
            "runAsNonRoot": True,
            "runAsUser": settings.proxy_uid,
        },
        "volumeMounts": [{"mountPath": MOUNTS[name], "name": name} for name in sorted(MOUNTS)],
    }


def init_command(pod: Mapping[str, Any], settings: InjectSettings, options: RedirectOptions,
                 status_port: int) -> list[str]:
    """`meshctl redirect` with the pod's capture annotations as flags (`injector.redirect` builds them).

    A status port moved off 15020 (`status.sidecar.istio.io/port`) is excluded from inbound capture
    too, as Istio does, so the kubelet's rewritten probes reach the agent, not Envoy.
    """
    notes: Mapping[str, str] = (pod.get("metadata") or {}).get("annotations") or {}
    values = options_from_annotations(notes)
    if status_port not in PROXY_INBOUND_PORTS and options.include_inbound_ports == ALL:
        excluded = [p for p in values.get("excludeInboundPorts", "").split(",") if p.strip()]
        values["excludeInboundPorts"] = ",".join([*excluded, str(status_port)])
    args = ["meshctl", "redirect", *command_args(values)]
    if settings.proxy_uid != options.proxy_uid:
        args += ["--proxy-uid", str(settings.proxy_uid)]
    if settings.proxy_gid != options.proxy_gid:
        args += ["--proxy-gid", str(settings.proxy_gid)]
    return args


def init_container(pod: Mapping[str, Any], settings: InjectSettings, options: RedirectOptions,
                   status_port: int) -> dict[str, Any]:
    """The `istio-init` container: root with NET_ADMIN/NET_RAW, installs the nat rules, exits."""
    return {
        "name": INIT_CONTAINER,
        "image": settings.proxy_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": init_command(pod, settings, options, status_port),
        "resources": {"limits": {"cpu": settings.init_cpu_limit, "memory": settings.init_memory_limit},
                      "requests": {"cpu": settings.init_cpu, "memory": settings.init_memory}},
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            "privileged": False,
            "readOnlyRootFilesystem": False,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "runAsUser": 0,
        },
    }


def volumes(settings: InjectSettings) -> list[dict[str, Any]]:
    """The sidecar's volumes, sorted by name."""
    found = [
        {"name": WORKLOAD_SOCKET, "emptyDir": {}},
        {"name": ENVOY, "emptyDir": {"medium": "Memory"}},
        {"name": DATA, "emptyDir": {}},
        {"name": PODINFO, "downwardAPI": {"items": [
            {"path": "annotations", "fieldRef": {"fieldPath": "metadata.annotations"}},
            {"path": "labels", "fieldRef": {"fieldPath": "metadata.labels"}},
        ]}},
        {"name": TOKEN, "projected": {"sources": [{"serviceAccountToken": {
            "audience": settings.token_audience, "expirationSeconds": settings.token_expiration_seconds,
            "path": "istio-token"}}]}},
        {"name": ROOT_CERT, "configMap": {"name": settings.root_cert_configmap}},
    ]
    return sorted(found, key=lambda v: str(v["name"]))
