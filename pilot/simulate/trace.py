"""`simulate`: one request through a proxy's resources, step by step, into a `Trace` (pure).

Steps, in Envoy's order: listener and filter chain (`listeners`), network RBAC, the HTTP
connection manager's route configuration (RDS by name or inline), virtual host, first matching
route, HTTP filters in chain order (JWT requirement, RBAC, fault on the route), then the route's
action and its cluster's endpoints. What Envoy decides at random or at run time (which endpoint
the load balancer picks, a partial fault percentage, a weighted split, retries) is reported as
candidates and probabilities, never guessed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pilot.simulate.listeners import Entry, select_listener
from pilot.simulate.matchers import normalize_path, route_match, select_virtual_host
from pilot.simulate.rbac import RbacDecision, decide
from pilot.simulate.request import Request
from pilot.simulate.resources import Resources

Json = Mapping[str, Any]
HCM = "envoy.filters.network.http_connection_manager"
TCP_PROXY = "envoy.filters.network.tcp_proxy"
REDIRECT_CODES = {"MOVED_PERMANENTLY": 301, "FOUND": 302, "SEE_OTHER": 303, "TEMPORARY_REDIRECT": 307,
                  "PERMANENT_REDIRECT": 308}
DENOMINATORS = {"HUNDRED": 100, "TEN_THOUSAND": 10_000, "MILLION": 1_000_000}


@dataclass(frozen=True)
class Backend:
    """A cluster the request may go to, with its share of traffic and its endpoints."""

    cluster: str
    percent: float
    endpoints: list[str] = field(default_factory=list)  # "ip:port" (weight w, priority p, health)
    dynamic: str | None = None  # endpoints decided per request (original destination, forward proxy, DNS)
    tls: str | None = None  # upstream TLS: "istio mTLS", "TLS origination (sni ...)"
    known: bool = True  # the cluster exists in CDS


@dataclass
class Trace:
    """Everything the simulation found; `outcome` and `status` sum it up.

    outcome: routed | redirect | direct_response | fault_abort | denied | tcp | not_found |
    no_listener | no_cluster | unauthenticated. `status` is the HTTP status Envoy itself would
    answer, None when the upstream answers.
    """

    request: dict[str, Any]
    outcome: str = "no_listener"
    status: int | None = None
    listener: str | None = None
    entry: str | None = None
    filter_chain: str | None = None
    route_config: str | None = None
    virtual_host: str | None = None
    route: str | None = None
    route_index: int | None = None
    match: dict[str, Any] | None = None
    action: str | None = None
    backends: list[Backend] = field(default_factory=list)
    redirect: str | None = None
    body: str | None = None
    rbac: list[RbacDecision] = field(default_factory=list)
    jwt: list[str] = field(default_factory=list)
    fault: dict[str, Any] | None = None
    timeout: str | None = None
    retry: dict[str, Any] | None = None
    mirrors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def matched(self) -> bool:
        """A route (or TCP proxy) took the request and no filter refused it: exit code 0."""
        return self.outcome in ("routed", "redirect", "direct_response", "fault_abort", "tcp")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["matched"] = self.matched
        return out


def simulate(resources: Resources, request: Request) -> Trace:
    """Follow `request` through `resources`; see the module docstring for the steps."""
    trace = Trace(request={"method": request.method, "scheme": request.scheme, "authority": request.authority,
                           "path": request.path, "port": request.port, "headers": [list(h) for h in request.headers],
                           "destination_ip": request.destination_ip, "source_ip": request.source_ip,
                           "source_principal": request.source_principal, "inbound": request.inbound})
    entry = select_listener(resources.listeners, request)
    if entry is None or entry.chain is None:
        if entry is not None:
            trace.listener, trace.entry = str(entry.listener.get("name")), entry.how
            trace.notes.append("no filter chain matches the connection: Envoy closes it")
        trace.outcome = "no_listener"
        return trace
    trace.listener, trace.entry = str(entry.listener.get("name")), entry.how
    trace.filter_chain = str(entry.chain.get("name") or (
        f"#{entry.chain_index}" if entry.chain_index is not None else "default"))
    for flt in entry.chain.get("filters", ()):
        name, config = str(flt.get("name", "")), flt.get("typedConfig") or {}
        if name == "envoy.filters.network.rbac":
            if _refused(trace, decide(name, config, request, entry.destination_port), 0):
                trace.notes.append("denied by a network RBAC filter: the connection is closed")
                return trace
        elif name == TCP_PROXY:
            _tcp(trace, resources, config)
            return trace
        elif name == HCM:
            _http(trace, resources, config, request, entry)
            return trace
    trace.outcome = "no_listener"
    trace.notes.append("the filter chain has neither an HTTP connection manager nor a TCP proxy")
    return trace


def _refused(trace: Trace, decision: RbacDecision, status: int) -> bool:
    trace.rbac.append(decision)
    if decision.outcome == "deny":
        trace.outcome, trace.status = "denied", status or None
        return True
    if decision.outcome == "unknown":
        trace.notes.append(f"{decision.filter} ({decision.action}): policy {decision.policy} depends on what "
                           "the request does not say (JWT claims, source address or principal)")
    return False


def _tcp(trace: Trace, resources: Resources, config: Json) -> None:
    trace.outcome, trace.action = "tcp", "tcp_proxy"
    if "weightedClusters" in config:
        _weighted(trace, resources, config["weightedClusters"])
    elif config.get("cluster"):
        trace.backends = [_backend(resources, str(config["cluster"]), 100.0)]


def _http(trace: Trace, resources: Resources, hcm: Json, request: Request, entry: Entry) -> None:
    routes = _route_config(trace, resources, hcm)
    if routes is None:
        trace.outcome, trace.status = "not_found", 404
        return
    ignore_port = bool(routes.get("ignorePortInHostMatching")) or bool(hcm.get("stripAnyHostPort"))
    vhost = select_virtual_host(routes.get("virtualHosts", ()), request.authority, ignore_port)
    if vhost is None:
        trace.outcome, trace.status = "not_found", 404
        trace.notes.append(f"no virtual host of {trace.route_config} has a domain for {request.authority!r} (404 NR)")
        return
    trace.virtual_host = str(vhost.get("name"))
    path = normalize_path(request.path_only) if hcm.get("normalizePath") else request.path_only
    if hcm.get("mergeSlashes"):
        while "//" in path:
            path = path.replace("//", "/")
    for index, route in enumerate(vhost.get("routes", ())):
        match = route.get("match") or {}
        if route_match(match, request, path):
            trace.route, trace.route_index, trace.match = str(route.get("name", "")) or None, index, dict(match)
            if "runtimeFraction" in match:
                trace.notes.append("the route's runtime_fraction is not evaluated (taken as matching)")
            _filters(trace, hcm, route, request, entry)
            if trace.outcome in ("denied", "unauthenticated"):
                return
            _action(trace, resources, vhost, route)
            return
    trace.outcome, trace.status = "not_found", 404
    trace.notes.append(f"no route of virtual host {trace.virtual_host} matches {request.path!r} (404 NR)")


def _route_config(trace: Trace, resources: Resources, hcm: Json) -> Json | None:
    if "routeConfig" in hcm:
        trace.route_config = str(hcm["routeConfig"].get("name", "")) + " (inline)"
        return dict(hcm["routeConfig"])
    name = str((hcm.get("rds") or {}).get("routeConfigName", ""))
    trace.route_config = name
    found = resources.routes.get(name)
    if found is None:
        trace.notes.append(f"route configuration {name!r} is not among the proxy's routes (RDS not sent?)")
    return found


def _filters(trace: Trace, hcm: Json, route: Json, request: Request, entry: Entry) -> None:
    per_route = route.get("typedPerFilterConfig") or {}
    for flt in hcm.get("httpFilters", ()):
        name, config = str(flt.get("name", "")), flt.get("typedConfig") or {}
        if name == "envoy.filters.http.jwt_authn":
            trace.jwt.extend(_jwt(config, request))
            if trace.jwt and trace.jwt[-1].endswith("(401)") and " absent" in trace.jwt[-1]:
                trace.outcome, trace.status = "unauthenticated", 401
                return
        elif name == "envoy.filters.http.rbac" and name not in per_route:
            if _refused(trace, decide(name, config, request, entry.destination_port), 403):
                trace.notes.append(f"RBAC: access denied (403) by {trace.rbac[-1].policy or 'no ALLOW policy'}")
                return
        elif name == "envoy.filters.http.fault" and name in per_route:
            trace.fault = _fault(per_route[name])


def _jwt(config: Json, request: Request) -> list[str]:
    """The JWT requirement of the first rule matching the path, and whether the request carries a token."""
    out = []
    for rule in config.get("rules", ()):
        if route_match(rule.get("match") or {}, request, request.path_only):
            providers = sorted((config.get("providers") or {}).keys())
            token = _has_token(config, request)
            missing_ok = "allowMissing" in str(rule.get("requires"))  # also allowMissingOrFailed
            out.append(f"providers {', '.join(providers)}; token {'present (not verified)' if token else 'absent'}"
                       + ("; a missing token is allowed" if missing_ok else "; a token is required (401)"))
            break
    return out


def _has_token(config: Json, request: Request) -> bool:
    for provider in (config.get("providers") or {}).values():
        headers = [h.get("name", "") for h in provider.get("fromHeaders", ())] or ["authorization"]
        params = list(provider.get("fromParams", ())) or (["access_token"] if not provider.get("fromHeaders") else [])
        if any(request.header(h) for h in headers) or any(p in request.query for p in params):
            return True
    return False


def _percent(fraction: Json | None) -> float:
    if not fraction:
        return 100.0
    return 100.0 * int(fraction.get("numerator", 0)) / DENOMINATORS.get(str(fraction.get("denominator", "HUNDRED")),
                                                                         100)


def _fault(config: Json) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "abort" in config:
        abort = config["abort"]
        status = abort.get("httpStatus")
        out["abort"] = {"http_status": status, "grpc_status": abort.get("grpcStatus"),
                        "percent": _percent(abort.get("percentage"))}
    if "delay" in config:
        delay = config["delay"]
        out["delay"] = {"fixed": delay.get("fixedDelay"), "percent": _percent(delay.get("percentage"))}
    return out


def _action(trace: Trace, resources: Resources, vhost: Json, route: Json) -> None:
    if "directResponse" in route:
        direct = route["directResponse"]
        trace.outcome, trace.action = "direct_response", "direct_response"
        trace.status = int(direct.get("status", 200))
        trace.body = (direct.get("body") or {}).get("inlineString")
        return
    if "redirect" in route:
        trace.outcome, trace.action = "redirect", "redirect"
        trace.status, trace.redirect = _redirect(route["redirect"], trace)
        return
    action = route.get("route") or {}
    trace.outcome = "routed"
    if "weightedClusters" in action:
        trace.action = "weighted_clusters"
        _weighted(trace, resources, action["weightedClusters"])
    elif "cluster" in action:
        trace.action = "cluster"
        trace.backends = [_backend(resources, str(action["cluster"]), 100.0)]
    else:
        trace.action = "cluster_header" if "clusterHeader" in action else "unsupported"
        trace.notes.append("the route picks its cluster at run time (cluster_header or plugin)")
    trace.timeout = str(action.get("timeout", "15s"))
    retry = action.get("retryPolicy") or vhost.get("retryPolicy")
    if retry:
        trace.retry = {"attempts": int(retry.get("numRetries", 1)), "on": retry.get("retryOn", ""),
                       "per_try_timeout": retry.get("perTryTimeout")}
    trace.mirrors = [f'{m.get("cluster")} ({_percent((m.get("runtimeFraction") or {}).get("defaultValue")):g}%)'
                     for m in action.get("requestMirrorPolicies", ())]
    abort = (trace.fault or {}).get("abort")
    if abort and abort["percent"] >= 100.0 and abort.get("http_status"):
        trace.outcome, trace.status = "fault_abort", int(abort["http_status"])
        return
    if abort:
        trace.notes.append(f"fault: {abort['percent']:g}% of requests are aborted")
    live = [b for b in trace.backends if b.percent > 0]
    if live and all(not b.known for b in live):
        trace.outcome, trace.status = "no_cluster", 503
        trace.notes.append("the route's cluster is not among the proxy's clusters (503 NC)")
    elif live and all(not b.endpoints and not b.dynamic for b in live):
        trace.status = 503
        trace.notes.append("no endpoint in the cluster: Envoy answers 503 (no healthy upstream)")


def _redirect(redirect: Json, trace: Trace) -> tuple[int, str]:
    req = trace.request
    scheme = "https" if redirect.get("httpsRedirect") else str(redirect.get("schemeRedirect") or req["scheme"])
    host = str(redirect.get("hostRedirect") or req["authority"].split(":")[0])
    port = redirect.get("portRedirect")
    authority = f"{host}:{port}" if port else (host if redirect.get("hostRedirect") else req["authority"])
    path, _, query = str(req["path"]).partition("?")
    if "pathRedirect" in redirect:
        path = str(redirect["pathRedirect"])
    elif "prefixRewrite" in redirect and trace.match and "prefix" in trace.match:
        path = str(redirect["prefixRewrite"]) + path[len(str(trace.match["prefix"])):]
    location = f"{scheme}://{authority}{path}" + ("" if redirect.get("stripQuery") or not query else f"?{query}")
    return REDIRECT_CODES.get(str(redirect.get("responseCode", "MOVED_PERMANENTLY")), 301), location


def _weighted(trace: Trace, resources: Resources, weighted: Json) -> None:
    clusters = list(weighted.get("clusters", ()))
    total = sum(int(c.get("weight", 0)) for c in clusters) or 1
    trace.backends = [_backend(resources, str(c.get("name")), 100.0 * int(c.get("weight", 0)) / total)
                      for c in clusters]


def _backend(resources: Resources, name: str, percent: float) -> Backend:
    cluster = resources.clusters.get(name)
    if cluster is None:
        return Backend(name, percent, known=False)
    kind = str(cluster.get("type", "STATIC"))
    if "clusterType" in cluster or kind == "ORIGINAL_DST":
        how = str((cluster.get("clusterType") or {}).get("name") or "original destination")
        return Backend(name, percent, dynamic=f"{how}: the address the request names", tls=_tls(cluster))
    assignment = cluster.get("loadAssignment")
    if assignment is None:
        service = (cluster.get("edsClusterConfig") or {}).get("serviceName") or name
        assignment = resources.endpoints.get(service, {})
    backend = Backend(name, percent, _endpoints(assignment), _tls(cluster))
    if kind in ("STRICT_DNS", "LOGICAL_DNS"):
        return dataclasses.replace(backend, dynamic=f"{kind}: the addresses DNS returns for the endpoints' names")
    return backend


def _endpoints(assignment: Json) -> list[str]:
    out = []
    for locality in assignment.get("endpoints", ()):
        priority = int(locality.get("priority", 0))
        for lb in locality.get("lbEndpoints", ()):
            sock = ((lb.get("endpoint") or {}).get("address") or {}).get("socketAddress") or {}
            extras = [f"weight {lb.get('loadBalancingWeight', 1)}"]
            if priority:
                extras.append(f"priority {priority}")
            if lb.get("healthStatus") not in (None, "HEALTHY", "UNKNOWN"):
                extras.append(str(lb["healthStatus"]))
            out.append(f"{sock.get('address')}:{sock.get('portValue')} ({', '.join(extras)})")
    return sorted(out)


def _tls(cluster: Json) -> str | None:
    sockets: Sequence[Json] = [m.get("transportSocket") or {} for m in cluster.get("transportSocketMatches", ())]
    if cluster.get("transportSocket"):
        sockets = [cluster["transportSocket"], *sockets]
    for sock in sockets:
        if "tls" not in str(sock.get("name", "")):
            continue
        config = sock.get("typedConfig") or {}
        common = config.get("commonTlsContext") or {}
        sni = config.get("sni")
        mtls = bool(common.get("tlsCertificateSdsSecretConfigs") or common.get("tlsCertificates"))
        kind = "mutual TLS" if mtls else "TLS origination"
        return kind + (f" (sni {sni})" if sni else "")
    return None
