"""Gateway: the ports and hosts a router proxy exposes. Parsed and validated; not translated yet."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from pydantic import Field

from pilot.api.base import ApiObject, IstioModel
from pilot.api.common import Port
from pilot.api.errors import FieldIssue


class Server(IstioModel):
    port: Port
    hosts: tuple[str, ...] = ()
    bind: str | None = None
    default_endpoint: str | None = None
    tls: dict[str, Any] | None = None
    name: str | None = None

    def problems(self, path: str) -> Iterator[FieldIssue]:
        if not self.hosts:
            yield FieldIssue(f"{path}.hosts", "at least one host is required")


class GatewaySpec(IstioModel):
    selector: dict[str, str] = Field(default_factory=dict)
    servers: tuple[Server, ...] = ()


class Gateway(ApiObject):
    KIND = "Gateway"
    kind: Literal["Gateway"]
    spec: GatewaySpec
