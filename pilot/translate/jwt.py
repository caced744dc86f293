"""RequestAuthentication as Envoy's JWT authentication filter, as Istio generates it.

One provider per JWT rule (``origins-<i>``, rules sorted by issuer), each with its keys inline:
the rule's ``jwks``, or what pilot fetched from ``jwksUri`` (or by OpenID discovery of the
issuer); until a fetch succeeds, a key set whose private key was thrown away, so every token
of that issuer fails (fail closed, as Istio does). The requirement is "any provider, or no token
at all": a request with an invalid token gets 401, one without a token passes, and an
AuthorizationPolicy that names request principals then refuses it (403). Verified claims land
in dynamic metadata under ``payload``, where `pilot.translate.rbac` reads them. Pure.
"""

from __future__ import annotations

import json
from typing import Any

from envoy.config.route.v3 import route_components_pb2 as route_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import empty_pb2

from pilot.model.authz import JwtRule
from pilot.translate.rbac import JWT_FILTER, JWT_PAYLOAD

# An RSA public key whose private key was discarded when it was made: nothing verifies against it.
UNVERIFIABLE_JWKS = json.dumps({"keys": [{
    "kty": "RSA", "alg": "RS256", "use": "sig", "kid": "meshctl-unverifiable", "e": "AQAB",
    "n": "u0FtcperWMlr_kZoo_kM_81RvezABvtm9SGFDc6NWrnz2EQ7PAlQENAor5kqL0cyIzh5I9E1llzEfFzeFMS9LZ1UNfnsLGwY36Hsy"
         "QPWiDCYfJded37aXSJyYM7RobYRdszwBhSHttWRTU-rLulpOlRy6xGzo3l0dI4izBIwA3DYiboQzhuuy0HcRjIklLzKWPxVaE8kpl_"
         "zDgGo4ZKUaEGpfFg3CriORpk-S8pLIyWLU7q0sfbcdX-dvOi8OMYE2ywiqrl3PwFlx2EStQAEFIPdMQkHaMstMhUVrARppPUemgfNF"
         "JKhL3bnp-ashjXle-9GQA4goYLR8enwO4_7Iw",
}]}, sort_keys=True)
# Claims Envoy splits on spaces into lists in the metadata (Istio's defaults, plus the rule's own).
DEFAULT_SPACE_DELIMITED = ("permission", "scope")


def _provider(rule: JwtRule) -> Any:
    provider = jwt_pb2.JwtProvider(
        issuer=rule.issuer,
        audiences=list(rule.audiences),
        forward=rule.forward_original_token,
        forward_payload_header=rule.output_payload_to_header,
        payload_in_metadata=JWT_PAYLOAD,
        from_params=list(rule.from_params),
        from_cookies=list(rule.from_cookies),
    )
    provider.normalize_payload_in_metadata.space_delimited_claims.extend(
        sorted({*DEFAULT_SPACE_DELIMITED, *rule.space_delimited_claims}))
    for header, claim in rule.claim_to_headers:
        provider.claim_to_headers.add(header_name=header, claim_name=claim)
    for name, prefix in rule.from_headers:
        provider.from_headers.add(name=name, value_prefix=prefix)
    provider.local_jwks.inline_string = rule.jwks if rule.jwks is not None else UNVERIFIABLE_JWKS
    return provider


def _provider_name(i: int) -> jwt_pb2.JwtRequirement:
    return jwt_pb2.JwtRequirement(provider_name=f"origins-{i}")


def _or(requirements: list[Any]) -> Any:
    return jwt_pb2.JwtRequirement(requires_any=jwt_pb2.JwtRequirementOrList(requirements=requirements))


def jwt_config(rules: tuple[JwtRule, ...]) -> Any:
    """The filter's config: with one rule, "that provider or no token"; with several, "any one
    provider, or every rule's (provider or no token)", which is Istio's form of the same."""
    config = jwt_pb2.JwtAuthentication(bypass_cors_preflight=True)
    allow_missing = jwt_pb2.JwtRequirement(allow_missing=empty_pb2.Empty())
    per_rule = []
    for i, rule in enumerate(rules):
        config.providers[f"origins-{i}"].CopyFrom(_provider(rule))
        per_rule.append(_or([_provider_name(i), allow_missing]))
    if len(per_rule) == 1:
        requires = per_rule[0]
    else:
        every = jwt_pb2.JwtRequirement(requires_all=jwt_pb2.JwtRequirementAndList(requirements=per_rule))
        requires = _or([*(_provider_name(i) for i in range(len(rules))), every])
    config.rules.add(match=route_pb2.RouteMatch(prefix="/"), requires=requires)
    return config


def jwt_filter(rules: tuple[JwtRule, ...]) -> Any | None:
    """The JWT HTTP filter for a workload's rules; None without rules."""
    if not rules:
        return None
    flt = hcm_pb2.HttpFilter(name=JWT_FILTER)
    flt.typed_config.Pack(jwt_config(rules))
    return flt
