"""Reading an Envoy admin `/config_dump` (and `/clusters?format=json`): pure functions, dicts in, rows out.

Envoy's dump is proto JSON with snake_case field names, one `configs[]` entry per kind
(`...ClustersConfigDump`, `...ListenersConfigDump`, ...). The functions here pick the kind,
flatten its static and dynamic parts, and turn each resource into the row `meshctl proxy-config`
shows (Istio's column names). Cluster names follow Istio (`outbound|9080|v1|reviews.default.svc.cluster.local`),
so direction, port, subset and host are read back from the name.

Which VirtualService or DestinationRule made a route or cluster comes from Istio's metadata
(`filter_metadata.istio.config`) when the resource carries it; else from pilot's `/debug/configz`
by host (`ConfigIndex`), which is what pilot used to build it.
"""

from __future__ import annotations

import base64
import datetime
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from pilot.translate.vhds import vhost_display_name

CLUSTERS = "ClustersConfigDump"
LISTENERS = "ListenersConfigDump"
ROUTES = "RoutesConfigDump"
ENDPOINTS = "EndpointsConfigDump"
SECRETS = "SecretsConfigDump"
BOOTSTRAP = "BootstrapConfigDump"


def section(dump: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The `configs[]` entry of one kind (e.g. CLUSTERS), or {} when Envoy has none."""
    for config in dump.get("configs", ()):
        if str(config.get("@type", "")).rsplit(".", 1)[-1] == kind:
            return dict(config)
    return {}


# --- resources by name (for diffs and -o json filters) -------------------------------------------------------------

def dynamic_resources(dump: Mapping[str, Any], short: str) -> dict[str, dict[str, Any]]:
    """The xDS resources of one type (CDS, LDS, RDS, EDS) Envoy got over ADS, by name."""
    if short == "CDS":
        items = section(dump, CLUSTERS).get("dynamic_active_clusters", ())
        return {c["cluster"]["name"]: c["cluster"] for c in items}
    if short == "LDS":
        items = section(dump, LISTENERS).get("dynamic_listeners", ())
        return {x["name"]: x["active_state"]["listener"] for x in items if "active_state" in x}
    if short == "RDS":
        items = section(dump, ROUTES).get("dynamic_route_configs", ())
        return {r["route_config"]["name"]: r["route_config"] for r in items}
    if short == "EDS":
        items = section(dump, ENDPOINTS).get("dynamic_endpoint_configs", ())
        return {e["endpoint_config"]["cluster_name"]: e["endpoint_config"] for e in items}
    raise ValueError(f"type {short!r} is not one of CDS, LDS, RDS, EDS")


def _all_clusters(dump: Mapping[str, Any]) -> list[tuple[dict[str, Any], bool]]:
    part = section(dump, CLUSTERS)
    return ([(c["cluster"], False) for c in part.get("static_clusters", ())]
            + [(c["cluster"], True) for c in part.get("dynamic_active_clusters", ())]
            + [(c["cluster"], True) for c in part.get("dynamic_warming_clusters", ())])


# --- cluster names --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClusterName:
    """An Istio cluster name split up; names of another form keep the whole name as `fqdn`."""

    fqdn: str
    port: str = "-"
    subset: str = "-"
    direction: str = "-"


def parse_cluster_name(name: str) -> ClusterName:
    parts = name.split("|")
    if len(parts) == 4 and parts[0] in ("outbound", "inbound"):
        return ClusterName(fqdn=parts[3] or "-", port=parts[1], subset=parts[2] or "-", direction=parts[0])
    return ClusterName(fqdn=name)


@dataclass(frozen=True)
class ClusterFilter:
    """`--fqdn --port --subset --direction` of proxy-config clusters/endpoints; None means any."""

    fqdn: str | None = None
    port: int | None = None
    subset: str | None = None
    direction: str | None = None

    def accepts(self, name: str) -> bool:
        parsed = parse_cluster_name(name)
        return ((self.fqdn is None or self.fqdn in (parsed.fqdn, name) or parsed.fqdn.startswith(self.fqdn + "."))
                and (self.port is None or parsed.port == str(self.port))
                and (self.subset is None or parsed.subset == self.subset)
                and (self.direction is None or parsed.direction == self.direction))


# --- which config object made a resource ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ConfigIndex:
    """VirtualServices and DestinationRules in force (from pilot's /debug/configz), by host."""

    virtual_services: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    destination_rules: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def from_configz(cls, configz: Mapping[str, Any], domain: str = "cluster.local") -> ConfigIndex:
        vs: dict[str, list[str]] = {}
        dr: dict[str, list[str]] = {}
        for obj in configz.get("objects", ()):
            ns, name = obj.get("namespace", ""), obj.get("name", "")
            spec = obj.get("object", {}).get("spec", obj.get("object", {}))
            if obj.get("kind") == "VirtualService":
                for host in spec.get("hosts", ()):
                    vs.setdefault(_fqdn(str(host), ns, domain), []).append(f"{name}.{ns}")
            elif obj.get("kind") == "DestinationRule" and spec.get("host"):
                dr.setdefault(_fqdn(str(spec["host"]), ns, domain), []).append(f"{name}.{ns}")
        return cls({k: tuple(sorted(v)) for k, v in vs.items()}, {k: tuple(sorted(v)) for k, v in dr.items()})


def _fqdn(host: str, namespace: str, domain: str) -> str:
    """Istio's short-name rule: a host without dots is in the object's namespace."""
    return host if "." in host or host == "*" else f"{host}.{namespace}.svc.{domain}"


def _istio_config(resource: Mapping[str, Any]) -> str | None:
    """`name.namespace` from Istio's `metadata.filter_metadata.istio.config` path, if present."""
    path = resource.get("metadata", {}).get("filter_metadata", {}).get("istio", {}).get("config")
    if not path:
        return None
    parts = str(path).strip("/").split("/")
    return f"{parts[-1]}.{parts[-3]}" if len(parts) >= 3 else str(path)


# --- table rows -----------------------------------------------------------------------------------------------------

CLUSTER_COLUMNS = ("SERVICE FQDN", "PORT", "SUBSET", "DIRECTION", "TYPE", "DESTINATION RULE")


def cluster_rows(dump: Mapping[str, Any], keep: ClusterFilter, index: ConfigIndex) -> list[tuple[str, ...]]:
    rows = []
    for cluster, _ in _all_clusters(dump):
        name = str(cluster["name"])
        if not keep.accepts(name):
            continue
        parsed = parse_cluster_name(name)
        kind = cluster.get("type") or cluster.get("cluster_type", {}).get("name", "STATIC")
        rule = _istio_config(cluster) or ", ".join(index.destination_rules.get(parsed.fqdn, ())) or "-"
        rows.append((parsed.fqdn, parsed.port, parsed.subset, parsed.direction, str(kind), rule))
    return sorted(rows)


LISTENER_COLUMNS = ("NAME", "ADDRESSES", "PORT", "MATCH", "DESTINATION")


def listener_rows(dump: Mapping[str, Any], port: int | None = None, name: str | None = None) -> list[tuple[str, ...]]:
    part = section(dump, LISTENERS)
    listeners = ([x["listener"] for x in part.get("static_listeners", ())]
                 + [x["active_state"]["listener"] for x in part.get("dynamic_listeners", ()) if "active_state" in x])
    rows = []
    for lst in listeners:
        address = lst.get("address", {}).get("socket_address", {})
        lport = str(address.get("port_value", "-"))
        if (port is not None and lport != str(port)) or (name is not None and lst.get("name") != name):
            continue
        for chain in lst.get("filter_chains", ()) or [{}]:
            rows.append((str(lst.get("name", "")), str(address.get("address", "-")), lport,
                         _chain_match(chain.get("filter_chain_match", {})), _chain_destination(chain)))
        if "default_filter_chain" in lst:
            rows.append((str(lst.get("name", "")), str(address.get("address", "-")), lport, "default",
                         _chain_destination(lst["default_filter_chain"])))
    return sorted(rows, key=lambda r: (int(r[2]) if r[2].isascii() and r[2].isdigit() else 0, r))


def _chain_match(match: Mapping[str, Any]) -> str:
    parts = []
    if "destination_port" in match:
        parts.append(f'port {match["destination_port"]}')
    ranges = [f'{r.get("address_prefix")}/{r.get("prefix_len", 32)}' for r in match.get("prefix_ranges", ())]
    if ranges:
        parts.append("addr " + ",".join(ranges))
    if match.get("server_names"):
        parts.append("SNI " + ",".join(match["server_names"]))
    if match.get("transport_protocol"):
        parts.append(f'trans {match["transport_protocol"]}')
    if match.get("application_protocols"):
        parts.append("app " + ",".join(match["application_protocols"]))
    return "; ".join(parts) or "ALL"


def _chain_destination(chain: Mapping[str, Any]) -> str:
    for flt in chain.get("filters", ()):
        config = flt.get("typed_config", {})
        if "rds" in config:
            return f'Route: {config["rds"].get("route_config_name", "")}'
        if "route_config" in config:
            return f'Inline Route: {config["route_config"].get("name", "")}'.rstrip()
        if "cluster" in config:
            return f'Cluster: {config["cluster"]}'
        if "weighted_clusters" in config:
            return "Clusters: " + ",".join(c["name"] for c in config["weighted_clusters"].get("clusters", ()))
    return "-"


ROUTE_COLUMNS = ("NAME", "VHOST NAME", "DOMAINS", "MATCH", "VIRTUAL SERVICE")


def route_rows(dump: Mapping[str, Any], index: ConfigIndex, name: str | None = None) -> list[tuple[str, ...]]:
    part = section(dump, ROUTES)
    configs = ([r["route_config"] for r in part.get("static_route_configs", ())]
               + [r["route_config"] for r in part.get("dynamic_route_configs", ())])
    rows = []
    for config in configs:
        if name is not None and config.get("name") != name:
            continue
        for vhost in config.get("virtual_hosts", ()):
            domains = _domains(vhost.get("domains", ()))
            host = vhost_display_name(config, vhost).rsplit(":", 1)[0]
            for route in vhost.get("routes", ()):
                service = _istio_config(route) or ", ".join(index.virtual_services.get(host, ())) or "-"
                rows.append((str(config.get("name", "")), vhost_display_name(config, vhost), domains,
                             route_match(route.get("match", {})), service))
    return sorted(rows, key=lambda r: r[:2])  # stable: routes keep Envoy's order inside a virtual host


def _domains(domains: Sequence[str]) -> str:
    """The longest domain stands for its short forms (as istioctl prints `reviews.default.svc.cluster.local`),
    one without a port or a trailing dot (the absolute form) where there is one."""
    if not domains:
        return "-"
    longest = max(domains, key=lambda d: (":" not in d, not d.endswith("."), len(d)))
    more = len(domains) - 1
    return f"{longest} +{more} more" if more else longest


def route_match(match: Mapping[str, Any]) -> str:
    path = (match.get("path") or (match.get("prefix") and f'{match["prefix"]}*')
            or match.get("safe_regex", {}).get("regex") or match.get("path_separated_prefix") or "/*")
    headers = [h.get("name", "") for h in match.get("headers", ())]
    return str(path) + (f' [headers: {", ".join(headers)}]' if headers else "")


ENDPOINT_COLUMNS = ("ENDPOINT", "STATUS", "OUTLIER CHECK", "CLUSTER")


def endpoint_rows(clusters: Mapping[str, Any], keep: ClusterFilter) -> list[tuple[str, ...]]:
    """From `/clusters?format=json`: each host of each cluster, its health and outlier state."""
    rows = []
    for status in clusters.get("cluster_statuses", ()):
        name = str(status.get("name", ""))
        if not keep.accepts(name):
            continue
        for host in status.get("host_statuses", ()):
            addr = host.get("address", {})
            sock = addr.get("socket_address")
            endpoint = f'{sock.get("address")}:{sock.get("port_value", 0)}' if sock else \
                f'unix://{addr.get("pipe", {}).get("path", "?")}'
            health = host.get("health_status", {})
            outlier = "FAILED" if health.get("failed_outlier_check") else "OK"
            rows.append((endpoint, _health(health), outlier, name))
    return sorted(rows, key=lambda r: (r[3], r[0]))


def _health(health: Mapping[str, Any]) -> str:
    failed = [k for k in ("failed_active_health_check", "failed_outlier_check", "failed_active_degraded_check",
                          "pending_dynamic_removal", "pending_active_hc") if health.get(k)]
    if failed:
        return "UNHEALTHY"
    return str(health.get("eds_health_status", "HEALTHY"))


SECRET_COLUMNS = ("RESOURCE NAME", "TYPE", "STATUS", "VALID CERT", "SERIAL NUMBER", "NOT AFTER", "NOT BEFORE")


def secret_rows(dump: Mapping[str, Any], now: datetime.datetime, name: str | None = None) -> list[tuple[str, ...]]:
    part = section(dump, SECRETS)
    entries = ([(s, "ACTIVE") for s in part.get("dynamic_active_secrets", ())]
               + [(s, "WARMING") for s in part.get("dynamic_warming_secrets", ())]
               + [(s, "STATIC") for s in part.get("static_secrets", ())])
    rows = []
    for entry, state in entries:
        secret = entry.get("secret", {})
        sname = str(entry.get("name") or secret.get("name", ""))
        if name is not None and sname != name:
            continue
        if "tls_certificate" in secret:
            kind, pem = "Cert Chain", secret["tls_certificate"].get("certificate_chain", {})
        elif "validation_context" in secret:
            kind, pem = "CA", secret["validation_context"].get("trusted_ca", {})
        else:
            rows.append((sname, "-", state, "-", "-", "-", "-"))
            continue
        rows.append((sname, kind, state, *_cert_columns(_source_bytes(pem), now)))
    return sorted(rows)


def _source_bytes(source: Mapping[str, Any]) -> bytes:
    if "inline_bytes" in source:
        return base64.b64decode(source["inline_bytes"])
    return str(source.get("inline_string", "")).encode()


def _cert_columns(pem: bytes, now: datetime.datetime) -> tuple[str, str, str, str]:
    """VALID CERT, SERIAL NUMBER, NOT AFTER, NOT BEFORE of the first certificate in `pem`."""
    try:
        cert = x509.load_pem_x509_certificates(pem)[0]
    except (ValueError, IndexError):
        return ("false", "-", "-", "-")
    valid = cert.not_valid_before_utc <= now <= cert.not_valid_after_utc
    return (str(valid).lower(), format(cert.serial_number, "x"), _iso(cert.not_valid_after_utc),
            _iso(cert.not_valid_before_utc))


def _iso(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# --- raw selections for -o json|yaml --------------------------------------------------------------------------------

def select_clusters(dump: Mapping[str, Any], keep: ClusterFilter) -> list[dict[str, Any]]:
    return [c for c, _ in _all_clusters(dump) if keep.accepts(str(c["name"]))]


def select_endpoints(clusters: Mapping[str, Any], keep: ClusterFilter) -> list[dict[str, Any]]:
    return [c for c in clusters.get("cluster_statuses", ()) if keep.accepts(str(c.get("name", "")))]


def select_named(items: Iterable[Mapping[str, Any]], name: str | None) -> list[dict[str, Any]]:
    return [dict(i) for i in items if name is None or i.get("name") == name]
