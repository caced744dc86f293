"""DestinationRule checks: hosts and subsets that match nothing, rules that merge, unverified TLS."""

from __future__ import annotations

from collections.abc import Iterator

from pilot.analysis import messages as msg
from pilot.analysis.context import Context
from pilot.api import DestinationRule
from pilot.api.traffic_policy import ClientTLSSettings, TLSMode
from pilot.model.build import precedence
from pilot.model.mesh import selects

_VERIFYING = (TLSMode.SIMPLE, TLSMode.MUTUAL)


def subset_selects_nothing(ctx: Context) -> Iterator[msg.Message]:
    """IST0173: a subset whose labels no instance of its service carries (requests to it get 503 UH).

    Checked only for services with known instances: a service whose instances the input does not
    show (an external name, a cluster not listed) cannot be judged."""
    for dr in ctx.of(DestinationRule):
        host = ctx.qualify(dr.spec.host, dr.metadata.namespace)
        instances = ctx.instance_labels(host)
        if not instances:
            continue
        for i, subset in enumerate(dr.spec.subsets):
            if subset.labels and not any(selects(subset.labels, labels) for labels in instances):
                wanted = ",".join(f"{k}={v}" for k, v in sorted(subset.labels.items()))
                yield ctx.message(msg.DR_SUBSET_NOT_SELECT_PODS, dr, f"spec.subsets[{i}].labels",
                                  f"The Subset {subset.name} defined in the DestinationRule does not select any pods "
                                  f"of {host} (labels {wanted}), which leads to 503 UH (NoHealthyUpstream)",
                                  "correct the subset's labels to those of the workloads, or deploy a workload "
                                  "with them")


def unknown_host(ctx: Context) -> Iterator[msg.Message]:
    """IST0174: a DestinationRule for a host no service declares."""
    for dr in ctx.of(DestinationRule):
        host = ctx.qualify(dr.spec.host, dr.metadata.namespace)
        if not ctx.service_known(host):
            yield ctx.message(msg.UNKNOWN_DR_HOST, dr, "spec.host",
                              f"The host {host} defined in the DestinationRule does not match any services in "
                              "the mesh",
                              "correct the host (a short name means a Service in the rule's own namespace), or "
                              "create the ServiceEntry or Service")


def conflicting_rules(ctx: Context) -> Iterator[msg.Message]:
    """MSH0102: several DestinationRules without workloadSelector for one host in one namespace.

    Pilot merges them as Istio does: subsets are combined (a repeated subset name keeps the oldest
    rule's), and only the oldest rule's trafficPolicy applies; the newer rules' policies are lost."""
    groups: dict[tuple[str, str], list[DestinationRule]] = {}
    for dr in ctx.of(DestinationRule):
        if dr.spec.workload_selector is None:
            key = (dr.metadata.namespace, ctx.qualify(dr.spec.host, dr.metadata.namespace))
            groups.setdefault(key, []).append(dr)
    for (namespace, host), rules in sorted(groups.items()):
        if len(rules) < 2:
            continue
        oldest = min(rules, key=precedence)
        names = ", ".join(sorted(r.metadata.name for r in rules))
        for dr in rules:
            if dr is oldest:
                continue
            lost = " (its trafficPolicy is ignored)" if dr.spec.traffic_policy is not None else ""
            yield ctx.message(msg.CONFLICTING_DESTINATION_RULES, dr, "spec.host",
                              f"DestinationRules {names} in namespace {namespace} all apply to host {host}: they "
                              f"are merged and the oldest, {oldest.metadata.name}, wins{lost}",
                              "merge them into one DestinationRule per host and namespace, or give each a "
                              "workloadSelector")


def _unverified(tls: ClientTLSSettings | None, selector: bool) -> bool:
    return (tls is not None and tls.mode in _VERIFYING and not tls.ca_certificates
            and not (tls.credential_name and selector))


def unverified_tls(ctx: Context) -> Iterator[msg.Message]:
    """IST0128 / IST0129: SIMPLE or MUTUAL TLS to a server whose certificate nothing verifies."""
    for dr in ctx.of(DestinationRule):
        policy, selector = dr.spec.traffic_policy, dr.spec.workload_selector is not None
        if policy is None:
            continue
        ns, name, host = dr.metadata.namespace, dr.metadata.name, dr.spec.host
        fix = "set caCertificates (or credentialName with a workloadSelector) so the server's certificate is checked"
        if _unverified(policy.tls, selector) and policy.tls is not None:
            yield ctx.message(msg.NO_SERVER_CERT_VERIFICATION_DR, dr, "spec.trafficPolicy.tls.caCertificates",
                              f"DestinationRule {name} in namespace {ns} has TLS mode set to {policy.tls.mode} but no "
                              f"caCertificates are set to validate server identity for host: {host}", fix)
        for i, port in enumerate(policy.port_level_settings):
            if _unverified(port.tls, selector) and port.tls is not None:
                number = port.port.number if port.port is not None else "?"
                yield ctx.message(msg.NO_SERVER_CERT_VERIFICATION_PORT, dr,
                                  f"spec.trafficPolicy.portLevelSettings[{i}].tls.caCertificates",
                                  f"DestinationRule {name} in namespace {ns} has TLS mode set to {port.tls.mode} but "
                                  f"no caCertificates are set to validate server identity for host: {host} at port "
                                  f"{number}", fix)
