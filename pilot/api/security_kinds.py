"""The ``security.istio.io`` kinds meshctl serves, for `pilot.api.parse`.

PeerAuthentication, AuthorizationPolicy and RequestAuthentication, under Istio's two versions.
"""

from __future__ import annotations

from collections.abc import Mapping

from pilot.api.authorization import AuthorizationPolicy
from pilot.api.base import ApiObject
from pilot.api.peer_authentication import PeerAuthentication
from pilot.api.request_authentication import RequestAuthentication
from pilot.api.security_common import GROUP as SECURITY_GROUP
from pilot.api.security_common import VERSIONS as SECURITY_VERSIONS

SECURITY_KINDS: Mapping[str, type[ApiObject]] = {cls.KIND: cls for cls in (
    AuthorizationPolicy, RequestAuthentication, PeerAuthentication)}

__all__ = ["SECURITY_GROUP", "SECURITY_KINDS", "SECURITY_VERSIONS"]
