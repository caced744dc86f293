"""What pilot would send a proxy now against what its Envoy holds: a per-type, per-resource diff (pure).

Pilot's `/debug/config_dump?proxy=` gives each type's resources as proto JSON (lowerCamelCase,
`@type`); Envoy's admin `/config_dump` gives what it accepted (snake_case). Both are parsed back
into protobuf messages and printed the same way, so equal config compares equal whatever the
spelling. Endpoints are compared by what they mean (cluster, address, port, weight, priority),
because Envoy rebuilds its EDS dump from its host sets and adds defaults pilot never sent.

Secrets (SDS) come from the workload agent, not pilot, and are not compared. Costs: one
parse and print per resource; a sidecar's config is small, this runs once per command.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from google.protobuf import any_pb2, json_format

from meshctl.envoy_dump import dynamic_resources
from pilot.translate.vhds import merged_json

COMPARED = ("CDS", "EDS", "LDS", "RDS")


def _register_types() -> None:
    """Import the Envoy protos pilot generates, so `@type` names resolve in the descriptor pool."""
    import pilot.bootstrap
    import pilot.translate.generate  # noqa: F401


def canonical(resource: Mapping[str, Any]) -> dict[str, Any]:
    """One proto-JSON resource (either spelling) as snake_case proto JSON; unchanged if its type is unknown."""
    _register_types()
    message = any_pb2.Any()
    try:
        json_format.ParseDict(dict(resource), message)
    except (json_format.ParseError, TypeError, KeyError):
        return dict(resource)
    text = json_format.MessageToJson(message, preserving_proto_field_name=True)
    out: dict[str, Any] = json.loads(text)  # plain dicts (MessageToDict nests OrderedDicts for Any)
    return out


def endpoint_summary(assignment: Mapping[str, Any]) -> dict[str, Any]:
    """A ClusterLoadAssignment reduced to what routing depends on, in either JSON spelling."""
    resource = canonical(assignment)
    hosts = []
    for group in resource.get("endpoints", ()):
        priority = int(group.get("priority", 0))
        for lb in group.get("lb_endpoints", ()):
            sock = lb.get("endpoint", {}).get("address", {}).get("socket_address", {})
            weight = int(lb.get("load_balancing_weight", 1))
            hosts.append(f'{sock.get("address")}:{sock.get("port_value", 0)} weight={weight} priority={priority}')
    return {"cluster_name": resource.get("cluster_name", ""), "endpoints": sorted(hosts)}


@dataclass
class TypeDiff:
    """One xDS type: pilot's version, the proxy's ACKed one, and the resources that differ."""

    type: str
    pilot_version: str
    acked_version: str
    resources: int
    only_in_pilot: list[str] = field(default_factory=list)
    only_in_proxy: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    text: str = ""  # the unified diff, `--- pilot` / `+++ proxy`
    # RDS of a VHDS proxy: the virtual hosts' own versions (pilot's, ACKed). A route change reaches
    # such a proxy as virtual hosts, so the configurations' versions alone would not show it arrived.
    vhds_versions: tuple[str, str] | None = None

    @property
    def in_sync(self) -> bool:
        return not (self.only_in_pilot or self.only_in_proxy or self.changed)

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, "in_sync": self.in_sync, "pilot_version": self.pilot_version,
                "acked_version": self.acked_version, "resources": self.resources,
                "only_in_pilot": self.only_in_pilot, "only_in_proxy": self.only_in_proxy, "changed": self.changed,
                "diff": self.text,
                **({"vhds_pilot_version": self.vhds_versions[0], "vhds_acked_version": self.vhds_versions[1]}
                   if self.vhds_versions is not None else {})}

    def versions(self) -> str:
        """Pilot's and the ACKed version for people, with the virtual hosts' for a VHDS proxy's RDS."""
        text = f"pilot {self.pilot_version[:12] or '-'}, ACKed {self.acked_version[:12] or '-'}"
        if self.vhds_versions is not None:
            vhds_pilot, vhds_acked = self.vhds_versions
            text += f"; its virtual hosts over VHDS: pilot {vhds_pilot[:12] or '-'}, ACKed {vhds_acked[:12] or '-'}"
        return text


def diff_proxy(pilot_dump: Mapping[str, Any], envoy_dump: Mapping[str, Any],
               acked: Mapping[str, str]) -> list[TypeDiff]:
    """Per type in COMPARED that pilot serves: pilot's resources against Envoy's dynamic ones.

    `acked` maps a type to the version the proxy last ACKed (from /debug/syncz). Resources Envoy
    holds that pilot never sends (e.g. PassthroughCluster's synthesized endpoints) are left out of
    EDS, since Envoy creates an assignment for every cluster, EDS or not.
    """
    out = []
    for short in COMPARED:
        served = pilot_dump.get(short)
        if served is None:
            continue
        want = {_name(short, r): r for r in served.get("resources", ())}
        if short == "RDS":  # a VHDS proxy's virtual hosts, merged into their configurations as Envoy does
            want = merged_json(want, (pilot_dump.get("VHDS") or {}).get("resources", ()))
        have = dynamic_resources(envoy_dump, short)
        if short == "EDS":
            eds_clusters = {n for n, c in dynamic_resources(envoy_dump, "CDS").items() if c.get("type") == "EDS"}
            have = {n: r for n, r in have.items() if n in eds_clusters or n in want}
        found = _diff_type(short, want, have, str(served.get("version", "")), acked.get(short, ""))
        vhds = pilot_dump.get("VHDS")
        if short == "RDS" and vhds is not None:
            found.vhds_versions = (str(vhds.get("version", "")), acked.get("VHDS", ""))
        out.append(found)
    return out


def _name(short: str, resource: Mapping[str, Any]) -> str:
    return str(resource.get("clusterName") or resource.get("cluster_name") or "") if short == "EDS" \
        else str(resource.get("name", ""))


def _diff_type(short: str, want: Mapping[str, Any], have: Mapping[str, Any], version: str, acked: str) -> TypeDiff:
    norm = endpoint_summary if short == "EDS" else canonical
    result = TypeDiff(short, version, acked, len(want))
    lines: list[str] = []
    for name in sorted(set(want) | set(have)):
        left = _yaml(norm(want[name])) if name in want else []
        right = _yaml(norm(have[name])) if name in have else []
        if name not in have:
            result.only_in_pilot.append(name)
        elif name not in want:
            result.only_in_proxy.append(name)
        elif left == right:
            continue
        else:
            result.changed.append(name)
        lines += difflib.unified_diff(left, right, f"pilot {short} {name}", f"proxy {short} {name}", lineterm="")
    result.text = "\n".join(lines)
    return result


def _yaml(resource: Mapping[str, Any]) -> list[str]:
    return str(yaml.safe_dump(dict(resource), sort_keys=True, default_flow_style=False)).splitlines()
