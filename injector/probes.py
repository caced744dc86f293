"""App probes rewritten through the agent (Istio's `sidecar.istio.io/rewriteAppHTTPProbers`).

With mutual TLS STRICT the kubelet's plaintext probe would be refused by the sidecar, and a TCP
probe would only reach Envoy. So each captured httpGet / tcpSocket / grpc probe becomes an HTTP
GET on the agent's status port (15020) at `/app-health/<container>/livez|readyz|startupz`; the
original probe (named ports resolved, HTTPS kept) goes to the sidecar in `ISTIO_KUBE_APP_PROBERS`
(JSON: path -> {httpGet|tcpSocket|grpc, timeoutSeconds}), and the agent runs it from inside the
pod. Probes on ports the init container does not capture are left alone: the kubelet reaches
them directly. Pure; touches only the given containers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

PROBERS_ENV = "ISTIO_KUBE_APP_PROBERS"
_KINDS = (("readinessProbe", "readyz"), ("livenessProbe", "livez"), ("startupProbe", "startupz"))
_ACTIONS = ("httpGet", "tcpSocket", "grpc")


def probe_path(container: str, suffix: str) -> str:
    """`/app-health/<container>/<livez|readyz|startupz>`: where the kubelet asks the agent."""
    return f"/app-health/{container}/{suffix}"


def _resolved_port(port: object, named: dict[str, int]) -> int | None:
    if isinstance(port, int):
        return port
    if isinstance(port, str):
        return int(port) if port.isascii() and port.isdigit() else named.get(port)
    return None


def _original(probe: dict[str, Any], named: dict[str, int]) -> dict[str, Any] | None:
    """The probe as the agent runs it (port resolved), or None when it is not rewritable."""
    for action in _ACTIONS:
        spec = probe.get(action)
        if not isinstance(spec, dict):
            continue
        port = _resolved_port(spec.get("port"), named)
        if port is None:
            return None
        out: dict[str, Any] = {action: {**copy.deepcopy(spec), "port": port}}
        if "timeoutSeconds" in probe:
            out["timeoutSeconds"] = probe["timeoutSeconds"]
        return out
    return None


def _rewritten(probe: dict[str, Any], path: str, status_port: int) -> dict[str, Any]:
    """The probe the kubelet runs instead: an HTTP GET on the agent, timings kept."""
    out = {k: v for k, v in probe.items() if k not in _ACTIONS}
    http = probe.get("httpGet")
    headers = {"httpHeaders": http["httpHeaders"]} if isinstance(http, dict) and "httpHeaders" in http else {}
    out["httpGet"] = {"path": path, "port": status_port, "scheme": "HTTP", **headers}
    return out


def rewrite_probes(containers: list[dict[str, Any]], status_port: int,
                   captured: Callable[[int], bool]) -> dict[str, dict[str, Any]]:
    """Rewrite the probes of `containers` in place; return the originals by agent path (for the env).

    `captured(port)` says whether inbound traffic to that port goes through the sidecar.
    """
    originals: dict[str, dict[str, Any]] = {}
    for container in containers:
        name = str(container.get("name", ""))
        named = {str(p["name"]): int(p["containerPort"]) for p in container.get("ports") or ()
                 if isinstance(p, dict) and p.get("name") and isinstance(p.get("containerPort"), int)}
        for field, suffix in _KINDS:
            probe = container.get(field)
            if not isinstance(probe, dict):
                continue
            original = _original(probe, named)
            if original is None:
                continue
            action = next(iter(k for k in original if k in _ACTIONS))
            if not captured(int(original[action]["port"])):
                continue
            path = probe_path(name, suffix)
            originals[path] = original
            container[field] = _rewritten(probe, path, status_port)
    return originals
