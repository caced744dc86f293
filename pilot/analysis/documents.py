"""Checks on documents as written: parse problems, schema warnings, deprecated fields and versions."""

from __future__ import annotations

from collections.abc import Iterator

from pilot.analysis import messages as msg
from pilot.analysis.context import Context
from pilot.api import VirtualService
from pilot.api.parse import GROUP
from pilot.api.security_kinds import SECURITY_GROUP

STABLE_VERSION = "v1"  # networking.istio.io and security.istio.io both serve v1 (Istio 1.22+)


def parse_problems(ctx: Context) -> Iterator[msg.Message]:
    """IST0106 / MSH0001 / MSH0002 / MSH0003: documents that did not become objects (found while loading)."""
    yield from ctx.inp.problems


def _deprecated(message: str) -> bool:
    return "deprecated" in message.lower()


def schema_warnings(ctx: Context) -> Iterator[msg.Message]:
    """IST0133: what the parser accepted with a warning (unknown fields, suspicious values)."""
    for obj in ctx.inp.objects:
        for issue in obj.warnings:
            if not _deprecated(issue.message):
                yield ctx.message(msg.SCHEMA_WARNING, obj, issue.path, f"Schema validation warning: {issue.message}",
                                  "remove or correct the field: pilot ignores what it reports")


# VirtualService fields Istio deprecated that pilot still honours: (path below spec.http[i], replacement).
_DEPRECATED_ROUTE_FIELDS = (
    ("mirror_percent", "mirrorPercent", "mirrorPercentage"),
    ("fault.delay.percent", "fault.delay.percent", "fault.delay.percentage"),
    ("cors_policy.allow_origin", "corsPolicy.allowOrigin", "corsPolicy.allowOrigins"),
)


def _field(obj: object, dotted: str) -> object:
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
    return obj


def deprecated_fields(ctx: Context) -> Iterator[msg.Message]:
    """IST0002: deprecated fields, those the parser flags (with what replaces them) and the
    VirtualService fields Istio deprecated that still work (mirrorPercent, delay percent, allowOrigin)."""
    fix = "use the replacement the message names; the deprecated field may stop working"
    for obj in ctx.inp.objects:
        for issue in obj.warnings:
            if _deprecated(issue.message):
                yield ctx.message(msg.DEPRECATED, obj, issue.path, f"Deprecated: {issue.message}", fix)
    for vs in ctx.of(VirtualService):
        for i, route in enumerate(vs.spec.http):
            for attr, path, replacement in _DEPRECATED_ROUTE_FIELDS:
                if _field(route, attr) not in (None, ()):
                    yield ctx.message(msg.DEPRECATED, vs, f"spec.http[{i}].{path}",
                                      f"Deprecated: {path} is deprecated; use {replacement}", fix)


def deprecated_api_versions(ctx: Context) -> Iterator[msg.Message]:
    """MSH0004: an Istio object written in an older apiVersion (v1alpha3, v1beta1) than the stable v1."""
    for obj in ctx.inp.objects:
        group, _, version = obj.api_version.rpartition("/")
        if group in (GROUP, SECURITY_GROUP) and version != STABLE_VERSION:
            yield ctx.message(
                msg.DEPRECATED_API_VERSION, obj, "apiVersion",
                f"{obj.api_version} is an older version of {group}; {group}/{STABLE_VERSION} has the same schema",
                f"change apiVersion to {group}/{STABLE_VERSION}")
