"""CORS: the Envoy CORS filter and the per-route policy a VirtualService ``corsPolicy`` becomes.

Like the fault filter, the CORS filter is always in the outbound chain with an empty config and
acts only on routes that carry a policy in ``typed_per_filter_config``.
"""

from __future__ import annotations

from typing import Any

from envoy.extensions.filters.http.cors.v3 import cors_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2

from pilot.model import mesh as m
from pilot.translate.faults import fractional_percent
from pilot.translate.matchers import string_matcher

CORS_FILTER = "envoy.filters.http.cors"


def cors_filter() -> Any:
    flt = hcm_pb2.HttpFilter(name=CORS_FILTER)
    flt.typed_config.Pack(cors_pb2.Cors())
    return flt


def cors_config(policy: m.CorsPolicy) -> Any:
    """The per-route CorsPolicy for ``typed_per_filter_config[CORS_FILTER]``."""
    out = cors_pb2.CorsPolicy(
        allow_origin_string_match=[string_matcher(o) for o in policy.allow_origins],
        allow_methods=",".join(policy.allow_methods),
        allow_headers=",".join(policy.allow_headers),
        expose_headers=",".join(policy.expose_headers),
    )
    if policy.max_age is not None:
        out.max_age = str(int(policy.max_age.total_seconds()))
    if policy.allow_credentials is not None:
        out.allow_credentials.value = policy.allow_credentials
    out.filter_enabled.default_value.CopyFrom(fractional_percent(100.0))
    out.forward_not_matching_preflights.value = policy.forward_unmatched_preflights
    return out
