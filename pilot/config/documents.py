"""What a source reports about the documents it read: objects kept and documents rejected."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from pilot.api import ApiObject


@dataclass(frozen=True, order=True)
class DocumentError:
    """A rejected document: where it is, what it claims to be, and why it was refused."""

    file: str
    index: int  # position among the file's non-empty documents, from 0
    kind: str | None
    namespace: str | None
    name: str | None
    message: str

    def __str__(self) -> str:
        return f"{self.file}[{self.index}]: {self.message}"

    @property
    def key(self) -> tuple[str, str, str] | None:
        """The store key of the object the document claims to be, when it names one fully."""
        if self.kind is None or self.namespace is None or self.name is None:
            return None
        return (self.kind, self.namespace, self.name)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class LoadResult:
    """Valid objects (invalid documents skipped) and one error per skipped document."""

    objects: tuple[ApiObject, ...] = ()
    errors: tuple[DocumentError, ...] = field(default=())
    # The same objects by store key, when the loader has them at hand (saves asking each again).
    keyed: Mapping[tuple[str, str, str], ApiObject] | None = field(default=None, compare=False, repr=False)

    def __add__(self, other: LoadResult) -> LoadResult:
        return LoadResult(self.objects + other.objects, self.errors + other.errors)
