"""Who an injected sidecar is, from what its pod gives it, and its Envoy bootstrap: pure functions.

The injected `istio-proxy` container (Istio's names, so Istio's injection templates and ours
agree) learns its identity from the environment the downward API fills in: POD_NAME,
POD_NAMESPACE, INSTANCE_IP, SERVICE_ACCOUNT; TRUST_DOMAIN; CA_ADDR; PROXY_CONFIG (ProxyConfig
as JSON or YAML: `discoveryAddress`, `statusPort`, `proxyMetadata`); ISTIO_DELTA_XDS (delta or
state-of-the-world ADS; also read from `proxyMetadata`, as Istio's agent does); every `ISTIO_META_<KEY>` becomes node
metadata `<KEY>` (a string; `ISTIO_METAJSON_<KEY>` a JSON value), e.g. INTERCEPTION_MODE=REDIRECT,
WORKLOAD_NAME, CLUSTER_ID, POD_PORTS; the labels come from the downward-API file
`/etc/istio/pod/labels` (`key="value"` lines). Flags override each of these.

`pod_bootstrap` turns a `PodProxy` into Istio's sidecar bootstrap for a pod whose traffic iptables
captures: node id `sidecar~<pod ip>~<pod>.<ns>~<ns>.svc.<domain>`, admin on 127.0.0.1:15000
only, the health (15021) and Prometheus (15090) listeners on all addresses (the kubelet and
scrapers reach the pod IP), no local-mesh bind address. It reuses `pilot.bootstrap` for
everything a local-mesh sidecar shares (ADS over mutual TLS, the agent's SDS cluster) and changes
only those fields. Pilot's certificate is verified for the discovery address's host, as Istio's
agent verifies istiod: a DNS SAN (`istiod.<ns>.svc`, which `meshctl up` derives from
`--mesh-namespace`), or an IP SAN when the address is an IP.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2

from citadel.identity import SpiffeId
from pilot.bootstrap import (
    HEALTH_LISTENER,
    STATS_LISTENER,
    XDS_CLUSTER,
    BootstrapError,
    BootstrapSpec,
    parse_host_port,
    sidecar_bootstrap,
)
from pilot.model.proxy import (
    META_BIND_ADDRESS,
    META_INSTANCE_IPS,
    META_LABELS,
    META_NAMESPACE,
    META_SERVICE_ACCOUNT,
    META_WORKLOAD,
    ProxyKind,
)

DEFAULT_DISCOVERY = "istiod.istio-system.svc:15012"
DEFAULT_STATUS_PORT = 15020
META_PREFIX = "ISTIO_META_"
META_JSON_PREFIX = "ISTIO_METAJSON_"
META_POD_NAME = "NAME"  # Istio's node metadata key for the pod name


class PodEnvError(ValueError):
    """The pod's environment (or a flag) cannot describe a sidecar: names the variable and the reason."""


@dataclass(frozen=True)
class PodProxy:
    """An injected sidecar: its pod, where the control plane is, and its node metadata."""

    pod_name: str
    namespace: str
    pod_ip: str
    service_account: str
    workload_name: str
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    metadata: Mapping[str, Any] = field(default_factory=dict, hash=False)  # from ISTIO_META_*
    discovery_address: str = DEFAULT_DISCOVERY
    ca_address: str = DEFAULT_DISCOVERY
    trust_domain: str = "cluster.local"
    cluster_domain: str = "cluster.local"
    status_port: int = DEFAULT_STATUS_PORT
    delta_xds: bool = True  # Istio's ISTIO_DELTA_XDS (default true since 1.22)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))

    @property
    def node_id(self) -> str:
        """Istio's `sidecar~<ip>~<pod>.<ns>~<ns>.svc.<domain>`."""
        return f"sidecar~{self.pod_ip}~{self.pod_name}.{self.namespace}~{self.namespace}.svc.{self.cluster_domain}"


def parse_labels_file(text: str) -> dict[str, str]:
    """The downward API's `key="value"` lines (values quoted with Go's escapes; JSON reads them)."""
    labels: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise PodEnvError(f"labels file line {number}: {line!r} is not key=\"value\"")
        try:
            decoded = json.loads(value)
        except ValueError:
            decoded = value.strip('"')
        labels[key] = str(decoded)
    return labels


def _proxy_config(environ: Mapping[str, str]) -> dict[str, Any]:
    text = environ.get("PROXY_CONFIG", "").strip()
    if not text:
        return {}
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PodEnvError(f"PROXY_CONFIG: not JSON or YAML ({exc})") from None
    if not isinstance(loaded, dict):
        raise PodEnvError("PROXY_CONFIG: must be a ProxyConfig object")
    return loaded


# Go's strconv.ParseBool, which Istio's agent reads its boolean variables with.
_GO_BOOLS = {**dict.fromkeys(("1", "t", "T", "TRUE", "true", "True"), True),
             **dict.fromkeys(("0", "f", "F", "FALSE", "false", "False"), False)}


def delta_xds(environ: Mapping[str, str], config: Mapping[str, Any]) -> bool:
    """ISTIO_DELTA_XDS from the container's environment, else from ProxyConfig's `proxyMetadata`
    (which Istio's injector also turns into environment variables), else true."""
    text = environ.get("ISTIO_DELTA_XDS")
    where = "ISTIO_DELTA_XDS"
    if text is None:
        metadata = config.get("proxyMetadata") or {}
        if not isinstance(metadata, dict):
            raise PodEnvError("PROXY_CONFIG: proxyMetadata must be a map of strings")
        found = metadata.get("ISTIO_DELTA_XDS")
        text, where = (None if found is None else str(found)), "PROXY_CONFIG: proxyMetadata.ISTIO_DELTA_XDS"
    if text is None:
        return True
    value = _GO_BOOLS.get(text.strip())
    if value is None:
        raise PodEnvError(f"{where} {text!r} is not a boolean (true or false)")
    return value


def node_metadata(environ: Mapping[str, str]) -> dict[str, Any]:
    """`ISTIO_META_<KEY>` -> `<KEY>` (string), `ISTIO_METAJSON_<KEY>` -> `<KEY>` (JSON value)."""
    meta: dict[str, Any] = {}
    for name in sorted(environ):
        if name.startswith(META_JSON_PREFIX) and len(name) > len(META_JSON_PREFIX):
            try:
                meta[name[len(META_JSON_PREFIX):]] = json.loads(environ[name])
            except ValueError as exc:
                raise PodEnvError(f"{name}: not JSON ({exc})") from None
        elif name.startswith(META_PREFIX) and len(name) > len(META_PREFIX):
            meta[name[len(META_PREFIX):]] = environ[name]
    return meta


_FLAGS = {"pod_name": "--workload NS/POD", "namespace": "--workload NS/POD", "pod_ip": "--address"}


def _required(environ: Mapping[str, str], overrides: Mapping[str, str | None], key: str, env: str) -> str:
    value = overrides.get(key) or environ.get(env, "").strip()
    if not value:
        raise PodEnvError(f"{env} is not set (the injected container gets it from the downward API); "
                          f"or pass {_FLAGS[key]}")
    return value


def pod_from_env(environ: Mapping[str, str], labels_text: str | None = None,
                 overrides: Mapping[str, str | None] | None = None) -> PodProxy:
    """The sidecar described by a container's environment and labels file; `overrides` (flags:
    pod_name, namespace, pod_ip, service_account, discovery_address, ca_address, trust_domain,
    cluster_domain, delta_xds "true"/"false") win over the environment. PodEnvError names what is
    missing or malformed."""
    over = overrides or {}
    config = _proxy_config(environ)
    meta = node_metadata(environ)
    pod_name = _required(environ, over, "pod_name", "POD_NAME")
    namespace = _required(environ, over, "namespace", "POD_NAMESPACE")
    pod_ip = _required(environ, over, "pod_ip", "INSTANCE_IP")
    try:
        ipaddress.ip_address(pod_ip)
    except ValueError:
        raise PodEnvError(f"INSTANCE_IP {pod_ip!r} is not an IP address") from None
    labels = parse_labels_file(labels_text) if labels_text is not None else {}
    if not labels and isinstance(meta.get(META_LABELS), dict):  # ISTIO_METAJSON_LABELS, older injectors
        labels = {str(k): str(v) for k, v in meta[META_LABELS].items()}
    discovery = (over.get("discovery_address") or str(config.get("discoveryAddress") or "")
                 or environ.get("PILOT_ADDRESS", "") or DEFAULT_DISCOVERY)
    status_port = config.get("statusPort", DEFAULT_STATUS_PORT)
    if not isinstance(status_port, int) or isinstance(status_port, bool) or not 0 < status_port < 65536:
        raise PodEnvError(f"PROXY_CONFIG: statusPort {status_port!r} is not a port number")
    pod = PodProxy(
        pod_name=pod_name,
        namespace=namespace,
        pod_ip=pod_ip,
        service_account=over.get("service_account") or environ.get("SERVICE_ACCOUNT", "").strip() or "default",
        workload_name=str(meta.get(META_WORKLOAD) or pod_name),
        labels=labels,
        metadata=meta,
        discovery_address=discovery,
        ca_address=over.get("ca_address") or environ.get("CA_ADDR", "").strip() or discovery,
        trust_domain=over.get("trust_domain") or environ.get("TRUST_DOMAIN", "").strip() or "cluster.local",
        cluster_domain=over.get("cluster_domain") or "cluster.local",
        status_port=status_port,
        delta_xds=delta_xds(environ, config) if over.get("delta_xds") is None else over["delta_xds"] == "true",
    )
    try:
        SpiffeId(pod.trust_domain, pod.namespace, pod.service_account)
    except ValueError as exc:
        raise PodEnvError(f"POD_NAMESPACE/SERVICE_ACCOUNT/TRUST_DOMAIN: not a workload identity: {exc}") from None
    for name, address in (("discovery address", pod.discovery_address), ("CA_ADDR", pod.ca_address)):
        try:
            parse_host_port(address)
        except BootstrapError:
            raise PodEnvError(f"{name} {address!r} is not host:port") from None
    return pod


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _dns_label(name: str) -> str:
    """A pod name as a DNS label (names may be subdomains); only temp-dir names and messages use it."""
    return re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-")[:63] or "pod"


def base_spec(pod: PodProxy, sds_socket: str, initial_fetch_timeout_s: float = 15.0) -> BootstrapSpec:
    """The local-mesh spec `pod_bootstrap` starts from: loopback admin, mutual TLS to pilot, the agent's SDS."""
    host, port = parse_host_port(pod.discovery_address)
    return BootstrapSpec(
        namespace=pod.namespace, workload=_dns_label(pod.pod_name), address="127.0.0.1", labels=pod.labels,
        service_account=pod.service_account, kind=ProxyKind.SIDECAR, pilot_host=host, pilot_port=port,
        cluster_domain=pod.cluster_domain, initial_fetch_timeout_s=initial_fetch_timeout_s,
        sds_socket=sds_socket, pilot_tls=True, pilot_san=host, delta_xds=pod.delta_xds)


def _verify_pilot_ip(bootstrap: bootstrap_pb2.Bootstrap, ip: str) -> None:
    """A discovery address given as an IP: pilot's certificate must carry it as an IP SAN (no SNI, which
    cannot be an address). `meshctl up` puts its --xds-tls address in its certificate."""
    xds = next(c for c in bootstrap.static_resources.clusters if c.name == XDS_CLUSTER)
    context = tls_pb2.UpstreamTlsContext()
    xds.transport_socket.typed_config.Unpack(context)
    context.sni = ""
    matchers = context.common_tls_context.combined_validation_context.default_validation_context
    del matchers.match_typed_subject_alt_names[:]
    matchers.match_typed_subject_alt_names.add(san_type=common_pb2.SubjectAltNameMatcher.IP_ADDRESS).matcher.exact = ip
    xds.transport_socket.typed_config.Pack(context)


def pod_bootstrap(pod: PodProxy, sds_socket: str, initial_fetch_timeout_s: float = 15.0) -> bootstrap_pb2.Bootstrap:
    """The Envoy bootstrap of the pod's sidecar (see the module docstring); pure and deterministic."""
    spec = base_spec(pod, sds_socket, initial_fetch_timeout_s)
    bootstrap = sidecar_bootstrap(spec)
    if _is_ip(spec.pilot_host):
        _verify_pilot_ip(bootstrap, spec.pilot_host)
    node = bootstrap.node
    node.id = pod.node_id
    node.cluster = f"{pod.workload_name}.{pod.namespace}"
    meta = node.metadata
    if META_BIND_ADDRESS in meta.fields:
        del meta.fields[META_BIND_ADDRESS]
    meta.update(dict(pod.metadata))
    meta.update({
        META_NAMESPACE: pod.namespace,
        META_POD_NAME: pod.pod_name,
        META_WORKLOAD: pod.workload_name,
        META_SERVICE_ACCOUNT: pod.service_account,
        META_INSTANCE_IPS: pod.pod_ip,
        META_LABELS: dict(sorted(pod.labels.items())),
    })
    wildcard = "::" if ipaddress.ip_address(pod.pod_ip).version == 6 else "0.0.0.0"
    for listener in bootstrap.static_resources.listeners:
        if listener.name in (HEALTH_LISTENER, STATS_LISTENER):
            listener.address.socket_address.address = wildcard
    return bootstrap
