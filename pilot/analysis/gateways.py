"""Gateway checks: selectors that pick no gateway workload, hosts no VirtualService serves, and
TLS servers whose credentialName secret does not exist."""

from __future__ import annotations

from collections.abc import Iterator

from pilot.analysis import messages as msg
from pilot.analysis.context import Context
from pilot.api import Gateway, VirtualService
from pilot.api.gateway import ServerTLSMode
from pilot.credentials import CA_SUFFIX, PREFIX
from pilot.model.hosts import host_matches, namespace_allows, split_scoped_host

_TERMINATING = (ServerTLSMode.SIMPLE, ServerTLSMode.MUTUAL, ServerTLSMode.OPTIONAL_MUTUAL)


def selector_not_found(ctx: Context) -> Iterator[msg.Message]:
    """IST0101: a Gateway whose selector matches no workload: no proxy serves it."""
    if not ctx.workloads_known:
        return
    for gw in ctx.of(Gateway):
        if gw.spec.selector and not ctx.selected(None, gw.spec.selector):
            labels = ",".join(f"{k}={v}" for k, v in sorted(gw.spec.selector.items()))
            yield ctx.message(msg.REFERENCED_RESOURCE_NOT_FOUND, gw, "spec.selector",
                              f'Referenced selector not found: "{labels}"',
                              "correct the selector to the labels of the gateway's pods or WorkloadEntry")


def _bound(ctx: Context, gw: Gateway) -> list[VirtualService]:
    key = (gw.metadata.namespace, gw.metadata.name)
    return [vs for vs in ctx.of(VirtualService)
            if any(ctx.gateway_ref(ref, vs.metadata.namespace) == key for ref in vs.spec.gateways)]


def host_without_virtual_service(ctx: Context) -> Iterator[msg.Message]:
    """MSH0101: a Gateway server host that no VirtualService bound to the Gateway serves: requests for
    it get 404 (HTTP) or are closed (TLS, TCP)."""
    for gw in ctx.of(Gateway):
        bound = _bound(ctx, gw)
        for i, server in enumerate(gw.spec.servers):
            if server.tls is not None and server.tls.https_redirect:
                continue  # a redirect-only server needs no routes
            for j, text in enumerate(server.hosts):
                scope, host = split_scoped_host(text, gw.metadata.namespace)
                if not any(namespace_allows(scope, vs.metadata.namespace) and
                           any(host_matches(host, h) or host_matches(h, host) for h in vs.spec.hosts)
                           for vs in bound):
                    yield ctx.message(msg.GATEWAY_HOST_WITHOUT_VS, gw, f"spec.servers[{i}].hosts[{j}]",
                                      f"no VirtualService bound to this Gateway serves host {text}, so requests for it "
                                      "find no route",
                                      f"add a VirtualService with host {host} and gateways "
                                      f"[{gw.metadata.namespace}/{gw.metadata.name}], or remove the host")


def missing_credentials(ctx: Context) -> Iterator[msg.Message]:
    """IST0161: a terminating TLS server whose credentialName secret (or, verifying clients, CA secret)
    is absent from the Gateway's namespace. Checked only when a secret store was read (a cluster's
    Secrets, the local mesh's state directory, or Secrets among the files)."""
    available = ctx.inp.secrets
    if available is None:
        return
    for gw in ctx.of(Gateway):
        ns = gw.metadata.namespace
        for i, server in enumerate(gw.spec.servers):
            tls = server.tls
            if tls is None or tls.mode not in _TERMINATING:
                continue
            names = [(f"spec.servers[{i}].tls.credentialName", tls.credential_name)] if tls.credential_name else []
            names += [(f"spec.servers[{i}].tls.credentialNames[{k}]", n) for k, n in enumerate(tls.credential_names)]
            for path, name in names:
                secret = name.removeprefix(PREFIX)
                if (ns, secret, "cert") not in available:
                    yield ctx.message(msg.INVALID_GATEWAY_CREDENTIAL, gw, path,
                                      f"The credential referenced by the Gateway {gw.metadata.name} in namespace {ns} "
                                      f"is invalid: no secret {secret} with a certificate (tls.crt) in namespace {ns}",
                                      f"create the TLS secret {secret} in namespace {ns} (a gateway reads only its "
                                      "own namespace's secrets)")
            if tls.mode != ServerTLSMode.SIMPLE and names:
                first = names[0][1].removeprefix(PREFIX)
                if (ns, first + CA_SUFFIX, "ca") not in available and (ns, first, "ca") not in available:
                    yield ctx.message(msg.INVALID_GATEWAY_CREDENTIAL, gw, names[0][0],
                                      f"The credential referenced by the Gateway {gw.metadata.name} in namespace {ns} "
                                      f"is invalid: {tls.mode} needs a client CA, but neither {first}{CA_SUFFIX} nor "
                                      f"ca.crt in {first} exists",
                                      f"add ca.crt to secret {first}, or create secret {first}{CA_SUFFIX}")


def conflicting_gateways(ctx: Context) -> Iterator[msg.Message]:
    """IST0145: Gateways with the same selector serving one port for overlapping hosts: the proxy
    can keep only one of those servers."""
    gateways = ctx.of(Gateway)
    for gw in gateways:
        selector = ",".join(f"{k}={v}" for k, v in sorted(gw.spec.selector.items()))
        for i, server in enumerate(gw.spec.servers):
            hosts = [split_scoped_host(h, gw.metadata.namespace)[1] for h in server.hosts]
            others = sorted({f"{o.metadata.namespace}/{o.metadata.name}" for o in gateways if o is not gw and
                             o.spec.selector == gw.spec.selector for s in o.spec.servers
                             if s.port.number == server.port.number and _overlap(
                                 hosts, [split_scoped_host(h, o.metadata.namespace)[1] for h in s.hosts])})
            if others:
                yield ctx.message(msg.CONFLICTING_GATEWAYS, gw, f"spec.servers[{i}]",
                                  f"Conflict with gateways {','.join(others)} (workload selector {selector}, port "
                                  f"{server.port.number}, hosts {','.join(server.hosts)})",
                                  "merge the servers into one Gateway, or give them other ports or disjoint hosts")


def _overlap(a: list[str], b: list[str]) -> bool:
    return any(host_matches(x, y) or host_matches(y, x) for x in a for y in b)
