"""RequestAuthentication (``security.istio.io`` v1/v1beta1): which JWTs a workload accepts.

Each ``jwtRules`` entry names an issuer and where its keys come from (``jwks`` inline, or
``jwksUri``, which pilot fetches and inlines). A request carrying an invalid token is rejected;
one carrying none passes, unless an AuthorizationPolicy asks for a request principal. The
validation is Istio's, in Istio's words.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterator
from typing import Any, Literal
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import Field

from pilot.api.base import ApiObject, Duration, IstioModel
from pilot.api.errors import FieldIssue
from pilot.api.security_common import PolicyTargetReference, WorkloadSelector, selection_problems

_HEADER_NAME = re.compile(r"^[a-zA-Z0-9!#$%&'*+\-.^_`|~]+$")  # an HTTP token (Envoy's rule)
_STRICT_HEADER_NAME = re.compile(r"^[-_A-Za-z0-9]+$")  # Istio's rule for outputClaimToHeaders
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi"})


def jwks_problem(text: str) -> str | None:
    """Why ``text`` is not a JSON Web Key Set (or a single key) Envoy can use, or None.

    Envoy refuses a JWT filter whose inline key set does not parse (the whole listener with
    it), so each key is checked the way Envoy's JWT library reads it: a known ``kty``, the
    members it needs, numbers and points that make a real public key, an ``alg`` of its family.
    """
    try:
        doc: Any = json.loads(text)
    except ValueError as exc:
        return f"jwks parse error: {exc}"
    if not isinstance(doc, dict):
        return "jwks parse error: must be a JSON object"
    keys = doc.get("keys", [doc] if "kty" in doc else None)
    if not isinstance(keys, list) or not keys:
        return "jwks parse error: must have a non-empty `keys` list"
    for i, key in enumerate(keys):
        found = _key_problem(key)
        if found is not None:
            return f"jwks parse error: key at index {i}: {found}"
    return None


_ALG_PREFIX = {"RSA": ("RS", "PS"), "EC": ("ES",), "oct": ("HS",), "OKP": ("EdDSA",)}
_CURVES = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}


def _b64_int(key: dict[str, Any], member: str) -> int:
    return int.from_bytes(_b64(key, member), "big")


def _b64(key: dict[str, Any], member: str) -> bytes:
    value = key.get(member)
    if not isinstance(value, str) or not value:
        raise ValueError(f"`{member}` is missing")
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (ValueError, binascii.Error):
        raise ValueError(f"`{member}` is not base64url") from None


def _key_problem(key: object) -> str | None:
    if not isinstance(key, dict) or not isinstance(key.get("kty"), str):
        return "has no `kty`"
    kty, alg = key["kty"], key.get("alg")
    if kty not in _ALG_PREFIX:
        return f"kty {kty!r} is not RSA, EC, oct or OKP"
    if alg is not None and (not isinstance(alg, str) or not alg.startswith(_ALG_PREFIX[kty])):
        return f"alg {alg!r} does not fit kty {kty}"
    try:
        if kty == "RSA":
            rsa.RSAPublicNumbers(_b64_int(key, "e"), _b64_int(key, "n")).public_key()
        elif kty == "EC":
            curve = _CURVES.get(key.get("crv", ""))
            if curve is None:
                return f"crv {key.get('crv')!r} is not P-256, P-384 or P-521"
            ec.EllipticCurvePublicNumbers(_b64_int(key, "x"), _b64_int(key, "y"), curve).public_key()
        elif kty == "oct":
            _b64(key, "k")
        elif key.get("crv") != "Ed25519" or len(_b64(key, "x")) != 32:
            return "an OKP key must be crv Ed25519 with a 32-byte `x`"
    except ValueError as exc:
        return str(exc) or "not a valid public key"
    return None


def jwks_keys(text: str) -> list[dict[str, Any]]:
    """The keys of a JWKS already checked by `jwks_problem`."""
    doc = json.loads(text)
    keys: list[dict[str, Any]] = doc.get("keys", [doc])
    return keys


def jwks_uri_problem(uri: str) -> str | None:
    """Istio accepts ``http`` and ``https`` JWKS URIs only."""
    try:
        parts = urlsplit(uri)
        _ = parts.port
    except ValueError as exc:
        return str(exc)
    if parts.scheme not in ("http", "https"):
        return f"URI scheme {parts.scheme!r} is not supported"
    if not parts.hostname:
        return f"{uri!r} has no host"
    return None


class JWTHeader(IstioModel):
    """A header the token may come in: ``name``, and a ``prefix`` to strip (``Bearer ``)."""

    name: str = ""
    prefix: str = ""

    def problems(self, path: str) -> Iterator[FieldIssue]:
        if not self.name:
            yield FieldIssue(f"{path}.name", "location header name must be non-empty string")


class ClaimToHeader(IstioModel):
    header: str = ""
    claim: str = ""

    def problems(self, path: str) -> Iterator[FieldIssue]:
        if not self.claim or not self.header:
            yield FieldIssue(path, "outputClaimToHeaders header and claim value must be non-empty string")
        elif not _STRICT_HEADER_NAME.match(self.header):
            yield FieldIssue(f"{path}.header", f"header name {self.header} is not a valid header name")


class JWTRule(IstioModel):
    issuer: str = ""
    audiences: tuple[str, ...] = ()
    jwks_uri: str = ""
    jwks: str = ""
    from_headers: tuple[JWTHeader, ...] = ()
    from_params: tuple[str, ...] = ()
    from_cookies: tuple[str, ...] = ()
    output_payload_to_header: str = ""
    forward_original_token: bool = False
    output_claim_to_headers: tuple[ClaimToHeader, ...] = ()
    space_delimited_claims: tuple[str, ...] = ()
    timeout: Duration | None = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        for i, audience in enumerate(self.audiences):
            if not audience:
                yield FieldIssue(f"{path}.audiences[{i}]", "audience must be non-empty string")
        if not self.issuer and not self.jwks_uri:
            yield FieldIssue(path, "issuer or jwksUri must be non-empty string")
        if self.jwks_uri and (found := jwks_uri_problem(self.jwks_uri)) is not None:
            yield FieldIssue(f"{path}.jwksUri", found)
        if self.jwks and (found := jwks_problem(self.jwks)) is not None:
            yield FieldIssue(f"{path}.jwks", found)
        for i, param in enumerate(self.from_params):
            if not param:
                yield FieldIssue(f"{path}.fromParams[{i}]", "location query must be non-empty string")
        for i, cookie in enumerate(self.from_cookies):
            if not cookie:
                yield FieldIssue(f"{path}.fromCookies[{i}]", "cookie name must be non-empty string")
        if self.output_payload_to_header and not _HEADER_NAME.match(self.output_payload_to_header):
            yield FieldIssue(f"{path}.outputPayloadToHeader",
                             f"header name {self.output_payload_to_header} is not a valid header name")

    def advisories(self, path: str) -> Iterator[FieldIssue]:
        if not self.jwks or jwks_problem(self.jwks) is not None:
            return
        for i, key in enumerate(jwks_keys(self.jwks)):
            if key.get("kty") == "oct" or _PRIVATE_MEMBERS & set(key):
                yield FieldIssue(f"{path}.jwks", f"jwks key at index {i} contains private key material; "
                                                 "only public keys are used for verification")


class RequestAuthenticationSpec(IstioModel):
    selector: WorkloadSelector | None = None
    target_ref: PolicyTargetReference | None = None
    target_refs: tuple[PolicyTargetReference, ...] = ()
    jwt_rules: tuple[JWTRule, ...] = Field(default=())

    def problems(self, path: str) -> Iterator[FieldIssue]:
        yield from selection_problems(path, self.selector, self.target_ref, self.target_refs)


class RequestAuthentication(ApiObject):
    KIND = "RequestAuthentication"
    kind: Literal["RequestAuthentication"]
    spec: RequestAuthenticationSpec = RequestAuthenticationSpec()
