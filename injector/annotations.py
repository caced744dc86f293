"""The pod annotations and labels the injector reads (Istio's names), parsed and checked.

`traffic(pod)` turns the `traffic.sidecar.istio.io/*` annotations (parsed by `injector.redirect`,
the init container's own parser) and `sidecar.istio.io/interceptionMode` into `RedirectOptions`,
or raises `InjectionError` naming the pod, the annotation and the reason: a bad annotation refuses
the pod (the API server shows the message) rather than starting a sidecar whose redirect rules
would fail inside the pod. Pure; costs microseconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from injector.redirect import (
    ALL,
    PROXY_INBOUND_PORTS,
    RedirectConfigError,
    RedirectOptions,
    options_from_annotations,
    parse_options,
)

INJECT = "sidecar.istio.io/inject"  # label or annotation; the label wins
STATUS = "sidecar.istio.io/status"
REWRITE_PROBES = "sidecar.istio.io/rewriteAppHTTPProbers"
INTERCEPTION_MODE = "sidecar.istio.io/interceptionMode"
STATUS_PORT = "status.sidecar.istio.io/port"
PROXY_CPU = "sidecar.istio.io/proxyCPU"
PROXY_MEMORY = "sidecar.istio.io/proxyMemory"
PROXY_CPU_LIMIT = "sidecar.istio.io/proxyCPULimit"
PROXY_MEMORY_LIMIT = "sidecar.istio.io/proxyMemoryLimit"
NAMESPACE_INJECTION = "istio-injection"  # namespace label: enabled / disabled
REVISION = "istio.io/rev"  # namespace label: the control-plane revision that injects it
TLS_MODE = "security.istio.io/tlsMode"  # pod label added on injection: the pod accepts mutual TLS
PROXY_CONFIG = "proxy.istio.io/config"  # ProxyConfig (YAML or JSON) for this pod's sidecar


class InjectionError(ValueError):
    """The pod cannot be injected as asked: the message names the pod, the annotation and why."""


def pod_ref(pod: Mapping[str, Any]) -> str:
    """`Pod namespace/name` (or the generateName prefix) for messages."""
    meta = pod.get("metadata") or {}
    name = meta.get("name") or (f"{meta['generateName']}*" if meta.get("generateName") else "<unnamed>")
    return f"Pod {meta.get('namespace') or 'default'}/{name}"


def traffic(pod: Mapping[str, Any]) -> RedirectOptions:
    """The pod's capture options (`injector.redirect` parses them, as the init container will);
    InjectionError for a malformed annotation or an interception mode other than REDIRECT."""
    notes: Mapping[str, str] = (pod.get("metadata") or {}).get("annotations") or {}
    mode = notes.get(INTERCEPTION_MODE, "REDIRECT")
    if mode == "TPROXY":
        raise InjectionError(f"{pod_ref(pod)}: annotation {INTERCEPTION_MODE}: TPROXY is not supported "
                             "(only REDIRECT: the proxy reads the original destination with SO_ORIGINAL_DST)")
    if mode != "REDIRECT":
        raise InjectionError(f"{pod_ref(pod)}: annotation {INTERCEPTION_MODE}: must be REDIRECT, not {mode!r}")
    try:
        return parse_options(options_from_annotations(notes))
    except RedirectConfigError as exc:
        raise InjectionError(f"{pod_ref(pod)}: {exc}") from None


def captures_inbound(options: RedirectOptions, port: int) -> bool:
    """Whether inbound traffic to `port` goes through the sidecar (so a probe on it must too)."""
    if options.include_inbound_ports != ALL:
        return port in options.include_inbound_ports
    return port not in PROXY_INBOUND_PORTS and port not in options.exclude_inbound_ports


def status_port(pod: Mapping[str, Any], default: int) -> int:
    """The agent's status port (`status.sidecar.istio.io/port`), where rewritten probes go."""
    notes: Mapping[str, str] = (pod.get("metadata") or {}).get("annotations") or {}
    value = notes.get(STATUS_PORT)
    if value is None:
        return default
    if not (value.isascii() and value.isdigit()) or not 0 < int(value) < 65536:
        raise InjectionError(f"{pod_ref(pod)}: annotation {STATUS_PORT}: {value!r} is not a port (1-65535)")
    return int(value)


def proxy_metadata(pod: Mapping[str, Any]) -> dict[str, str]:
    """`proxyMetadata` of the pod's `proxy.istio.io/config` annotation: variables for the sidecar's
    environment (Istio's agent settings, e.g. `ISTIO_DELTA_XDS: "false"`), in the annotation's order.

    Only `proxyMetadata` of that ProxyConfig is applied here (see the README's injection table for
    the rest). As in Istio, the values are strings: an unquoted `false` is refused with a hint,
    since YAML reads it as a boolean. InjectionError names the pod, the annotation and the field.
    """
    notes: Mapping[str, str] = (pod.get("metadata") or {}).get("annotations") or {}
    text = notes.get(PROXY_CONFIG)
    if text is None:
        return {}
    where = f"{pod_ref(pod)}: annotation {PROXY_CONFIG}"
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InjectionError(f"{where}: not YAML or JSON ({exc})".replace("\n", " ")) from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise InjectionError(f"{where}: must be a ProxyConfig object, not {type(config).__name__}")
    metadata = config.get("proxyMetadata")
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InjectionError(f"{where}: proxyMetadata must be a map of names to strings")
    out: dict[str, str] = {}
    for name, value in metadata.items():
        if not isinstance(name, str) or not name or "=" in name:
            raise InjectionError(f"{where}: proxyMetadata: {name!r} is not an environment variable name")
        if not isinstance(value, str):
            raise InjectionError(f"{where}: proxyMetadata.{name}: {value!r} is not a string (quote it: "
                                 f"{name}: \"{str(value).lower() if isinstance(value, bool) else value}\")")
        out[name] = value
    return out
