"""Shared building blocks of the API models: the base model, metadata and field types.

Models are frozen pydantic v2 models with camelCase aliases, so Istio YAML parses as
written. Unknown keys are kept (``extra="allow"``) rather than rejected: Istio adds fields
faster than we do, and a warning that a field is ignored beats refusing the whole object.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Annotated, Any, ClassVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PrivateAttr,
)
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

from pilot.api.envoy_limits import MAX_DURATION_SECONDS
from pilot.api.errors import FieldIssue


def rule_error(message: str) -> PydanticCustomError:
    # A custom error type keeps the message verbatim (no "Value error, " prefix).
    return PydanticCustomError("meshctl", message)


def between(lo: int, hi: int) -> AfterValidator:
    """A validator for an int in [lo, hi], with Istio-style wording."""

    def check(value: int) -> int:
        if not lo <= value <= hi:
            raise rule_error(f"must be between {lo} and {hi}")
        return value

    return AfterValidator(check)


PortNumber = Annotated[int, Field(strict=True), between(1, 65535)]
Percent = Annotated[int, Field(strict=True), between(0, 100)]


def _float_percent(value: float) -> float:
    if not 0.0 <= value <= 100.0:
        raise rule_error("must be between 0 and 100")
    return value


FloatPercent = Annotated[float, AfterValidator(_float_percent)]  # Istio's `Percent` message and the like
NonNegative = Annotated[int, Field(strict=True), between(0, 2**31 - 1)]

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _check_dns_label(value: str) -> str:
    if not _DNS_LABEL.match(value):
        raise rule_error("must be a lowercase RFC 1123 label (a-z, 0-9, '-', at most 63 characters)")
    return value


def _check_dns_subdomain(value: str) -> str:
    if len(value) > 253 or not _DNS_SUBDOMAIN.match(value):
        raise rule_error("must be a lowercase RFC 1123 subdomain (a-z, 0-9, '-', '.')")
    return value


def check_host(value: str) -> str:
    """A host name, optionally with a leading ``*.`` wildcard, or ``*`` alone."""
    if value == "*":
        return value
    bare = value[2:] if value.startswith("*.") else value
    if len(value) > 253 or not _DNS_SUBDOMAIN.match(bare):
        raise rule_error(f"{value!r} is not a valid lowercase host name (optionally prefixed by '*.')")
    return value


DnsLabel = Annotated[str, AfterValidator(_check_dns_label)]
DnsSubdomain = Annotated[str, AfterValidator(_check_dns_subdomain)]
Host = Annotated[str, AfterValidator(check_host)]

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(h|ms|m|s|us|µs|ns)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


def parse_duration(value: object) -> timedelta:
    """Parse a Go/protobuf-style duration such as ``10s``, ``1.5s``, ``250ms`` or ``1m30s``."""
    if isinstance(value, timedelta):
        return value
    if not isinstance(value, str) or not value:
        raise rule_error("must be a duration string such as '10s' or '250ms'")
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(value):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(value):
        raise rule_error(f"{value!r} is not a duration such as '10s' or '250ms'")
    if total > MAX_DURATION_SECONDS:
        raise rule_error(f"{value!r} is longer than Envoy's longest duration ({MAX_DURATION_SECONDS}s, ~292 years)")
    return timedelta(seconds=total)


def format_duration(value: timedelta) -> str:
    """Protobuf JSON form: seconds with up to 6 decimals, e.g. ``0.25s``."""
    text = f"{value.total_seconds():.6f}".rstrip("0").rstrip(".")
    return f"{text}s"


Duration = Annotated[timedelta, BeforeValidator(parse_duration), PlainSerializer(format_duration)]


# Field-name sets shared between models that were given the same fields (`IstioModel.model_post_init`).
# Keys are sets of declared field names only (unknown keys are never shared), so the table
# stays as small as the distinct shapes of the config; the cap bounds it regardless.
_SHARED_FIELDS_SETS: dict[frozenset[str], set[str]] = {}
_SHARED_FIELDS_SETS_CAP = 4096


def _interned(value: Any) -> Any:
    return sys.intern(value) if type(value) is str else value


class IstioModel(BaseModel):
    """Base of every API model: camelCase aliases, frozen, unknown keys kept for warnings."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="allow",
        frozen=True,
    )

    def model_post_init(self, context: Any, /) -> None:
        """Share what many parsed models repeat instead of keeping a copy in each.

        - String fields, and the keys and values of string maps (labels), are interned: the
          parser makes a new ``"networking.istio.io/v1"``, namespace, ``"app"`` or ``"v1"`` per
          occurrence.
        - Without unknown keys, the empty ``{}`` pydantic keeps for them becomes None (the same
          to pydantic), and the set of field names given is shared with every model given the
          same names. Sharing is safe because frozen models never add to the set and
          ``model_copy`` copies it before adding.

        Why: a 1,000-service mesh parses into ~36,000 models holding ~85,000 strings of which
        ~14,000 differ. The duplicates cost 4 MB and the two containers ~280 bytes per model
        (10 MB): together a third of the parsed config (37 -> 24 MB). Cost: ~2 us per model,
        73 ms of the 1.4 s that parsing a 1,000-service directory takes.
        """
        fields = self.__dict__
        for name, value in fields.items():
            if type(value) is str:
                fields[name] = sys.intern(value)
            elif type(value) is dict and value:
                fields[name] = {_interned(k): _interned(v) for k, v in value.items()}
        if self.__pydantic_extra__:
            return
        object.__setattr__(self, "__pydantic_extra__", None)
        given = frozenset(self.__pydantic_fields_set__)
        shared = _SHARED_FIELDS_SETS.get(given)
        if shared is None:
            if len(_SHARED_FIELDS_SETS) >= _SHARED_FIELDS_SETS_CAP:
                return
            shared = _SHARED_FIELDS_SETS[given] = set(given)
        object.__setattr__(self, "__pydantic_fields_set__", shared)

    def problems(self, path: str) -> Iterator[FieldIssue]:
        """Errors the schema alone cannot express (oneofs, cross-field rules); paths from ``path``."""
        return iter(())

    def advisories(self, path: str) -> Iterator[FieldIssue]:
        """Legal but suspicious values, reported as warnings."""
        return iter(())


class LabelSelector(IstioModel):
    """Istio's WorkloadSelector: every label given must be present with the same value."""

    labels: dict[str, str] = Field(default_factory=dict)

    def matches(self, labels: dict[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in self.labels.items())


class ObjectMeta(IstioModel):
    """The Kubernetes metadata fields meshctl reads; other standard ones are accepted silently."""

    name: DnsSubdomain
    namespace: DnsLabel = "default"
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    creation_timestamp: datetime | None = None
    resource_version: str | None = None
    generation: int | None = None
    uid: str | None = None
    # Standard Kubernetes bookkeeping: accepted and ignored, so never warned about.
    managed_fields: Any = None
    owner_references: Any = None
    finalizers: Any = None
    generate_name: Any = None
    deletion_timestamp: Any = None
    deletion_grace_period_seconds: Any = None
    self_link: Any = None


# ObjectMeta fields Kubernetes maintains on every write: not part of what an object asks for.
BOOKKEEPING: dict[str, Any] = {"resource_version": None, "generation": None, "uid": None,
                               "creation_timestamp": None, "managed_fields": None, "self_link": None}


class ApiObject(IstioModel):
    """A top-level Istio object. Subclasses set ``KIND`` and a typed ``spec``."""

    KIND: ClassVar[str] = ""
    api_version: str
    kind: str
    metadata: ObjectMeta
    status: Any = None
    _warnings: tuple[FieldIssue, ...] = PrivateAttr(default=())

    @property
    def key(self) -> tuple[str, str, str]:
        """(kind, namespace, name): the identity of the object in the config store."""
        return (self.kind, self.metadata.namespace, self.metadata.name)

    @property
    def ref(self) -> str:
        """``Kind namespace/name``, for messages."""
        return f"{self.kind} {self.metadata.namespace}/{self.metadata.name}"

    def to_dict(self) -> dict[str, Any]:
        """The object as JSON-ready data in Istio's field names (debug pages, dumps)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    def same_content(self, other: ApiObject) -> bool:
        """Whether `other` says the same as this object: equal but for `status` and the metadata
        Kubernetes keeps (`BOOKKEEPING`: resourceVersion, generation, ...), which a status write
        changes without changing what the object asks for. What `content_hash` hashes
        (`pilot.distribution`), compared without the JSON: two shallow copies and model equality."""
        return type(self) is type(other) and self.content() == other.content()

    def content(self) -> ApiObject:
        """A shallow copy without `status` and the `BOOKKEEPING` metadata."""
        return self.model_copy(update={"status": None, "metadata": self.metadata.model_copy(update=BOOKKEEPING)})

    @property
    def warnings(self) -> tuple[FieldIssue, ...]:
        """Unknown fields and legal-but-suspicious values found when the object was parsed."""
        return self._warnings


def collect_issues(model: BaseModel, path: str = "") -> tuple[list[FieldIssue], list[FieldIssue]]:
    """Walk a parsed model: (rule errors, warnings) from every nested ``IstioModel``."""
    errors: list[FieldIssue] = []
    warnings: list[FieldIssue] = []
    _collect(model, path, errors, warnings)
    return errors, warnings


def _collect(value: object, path: str, errors: list[FieldIssue], warnings: list[FieldIssue]) -> None:
    if isinstance(value, IstioModel):
        warnings.extend(
            FieldIssue(_join(path, k), "unknown field, ignored") for k in sorted(value.model_extra or {})
        )
        errors.extend(value.problems(path))
        warnings.extend(value.advisories(path))
        for name, info in type(value).model_fields.items():
            if name != "status":
                _collect(getattr(value, name), _join(path, info.alias or name), errors, warnings)
    elif isinstance(value, tuple | list):
        for i, item in enumerate(value):
            _collect(item, f"{path}[{i}]", errors, warnings)
    elif isinstance(value, dict):
        for k, item in value.items():
            _collect(item, _join(path, str(k)), errors, warnings)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def one_of(
    model: BaseModel, path: str, fields: tuple[str, ...], what: str, *, required: bool = True
) -> Iterator[FieldIssue]:
    """Istio's oneof rule: at most one (exactly one if ``required``) of ``fields`` is set."""
    present = [f for f in fields if getattr(model, f) is not None]
    if len(present) > 1 or (required and not present):
        names = ", ".join(to_camel(f) for f in fields)
        yield FieldIssue(path, f"{what} must set {'exactly' if required else 'at most'} one of {names}")
