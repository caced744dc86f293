"""A proxy's xDS resources in the JSON form Envoy and pilot print, indexed by name (pure)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from pilot.translate.vhds import merged_json

Json = dict[str, Any]
_SHORT = {"LDS": "listeners", "RDS": "routes", "CDS": "clusters", "EDS": "endpoints"}


@dataclass(frozen=True)
class Resources:
    """Listeners (in the order given), and route configurations, clusters and endpoint assignments by name."""

    listeners: tuple[Json, ...] = ()
    routes: Mapping[str, Json] = field(default_factory=dict)
    clusters: Mapping[str, Json] = field(default_factory=dict)
    endpoints: Mapping[str, Json] = field(default_factory=dict)

    @classmethod
    def from_config_dump(cls, dump: Mapping[str, Any]) -> Resources:
        """From pilot's `/debug/config_dump?proxy=` body: `{"LDS": {"resources": [...]}, ...}`."""
        lists: dict[str, list[Json]] = {}
        for short, attr in {**_SHORT, "VHDS": "vhosts"}.items():
            section = dump.get(short) or {}
            items = section.get("resources", []) if isinstance(section, Mapping) else []
            lists[attr] = [_strip_any(r) for r in items]
        return cls._from_lists(lists)

    @classmethod
    def from_messages(cls, by_type: Mapping[str, Mapping[str, Any]]) -> Resources:
        """From generated protobufs, `{type_url: {name: message}}` (pilot's `generate` output)."""
        lists: dict[str, list[Json]] = {}
        for type_url, messages in by_type.items():
            attr = _attr_of(type_url)
            if attr is not None:
                lists[attr] = [json_format.MessageToDict(m) for m in messages.values()]
        return cls._from_lists(lists)

    @classmethod
    def _from_lists(cls, lists: Mapping[str, list[Json]]) -> Resources:
        """Virtual hosts a VHDS proxy takes apart (`vhosts`) join their route configurations, as in Envoy."""
        routes = merged_json({r.get("name", ""): r for r in lists.get("routes", [])}, lists.get("vhosts", []))
        return cls(
            listeners=tuple(lists.get("listeners", [])),
            routes=routes,
            clusters={c.get("name", ""): c for c in lists.get("clusters", [])},
            endpoints={e.get("clusterName", ""): e for e in lists.get("endpoints", [])},
        )


def _attr_of(type_url: str) -> str | None:
    tail = type_url.rsplit(".", 1)[-1]
    return {"Listener": "listeners", "RouteConfiguration": "routes", "Cluster": "clusters",
            "ClusterLoadAssignment": "endpoints", "VirtualHost": "vhosts"}.get(tail)


def _strip_any(resource: Json) -> Json:
    """A resource without its Any wrapper's `@type` (the fields are the message's own)."""
    return {k: v for k, v in resource.items() if k != "@type"}
