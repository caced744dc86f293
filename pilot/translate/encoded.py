"""A generated message handed over as its serialization alone.

Why: the outbound route configuration of a sidecar holds a virtual host per service port, 1,000
at mission scale, and there is one per namespace with sidecars. As a protobuf message it takes
~2.1 MB (upb) besides its 0.57 MB of bytes, and a routing edit would copy all of it to replace
one virtual host and then serialize it again. Kept as bytes, made by joining the virtual hosts'
own encodings (protobuf's encoding of a repeated field is the concatenation of its elements),
a namespace costs its bytes, and an edit is a join of shared pieces (see
`pilot.translate.routes.carried_outbound_config`).

The same holds, per message, for what generators keep for the whole mesh: the outbound clusters
and ClusterLoadAssignments are handed over encoded (`encoded_values`), ~300 bytes each instead of
a ~2.5-3 KB message.

The snapshot layer serializes messages with `SerializeToString(deterministic=True)`, which this
answers with the bytes themselves; `message()` parses them for anyone who needs the fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, eq=False)
class Encoded:
    """`value`, the deterministic serialization of a `message_type` message."""

    message_type: Any
    value: bytes

    def SerializeToString(self, deterministic: bool = False) -> bytes:
        """The bytes: already the deterministic encoding, so either way the same."""
        return self.value

    def message(self) -> Any:
        """The message itself, parsed anew on each call (the bytes are what is kept)."""
        return self.message_type.FromString(self.value)


def encoded(message: Any) -> Encoded:
    """`message` handed over as its deterministic encoding alone (see `encoded_values`)."""
    return Encoded(type(message), message.SerializeToString(deterministic=True))


def encoded_values(messages: Mapping[str, Any]) -> dict[str, Encoded]:
    """The same names, each message `encoded`, for a generator's results that are kept.

    Why: a service's outbound clusters and ClusterLoadAssignments are carried from one mesh version
    to the next (`pilot.translate.memo.carried`) and shared by every class: 6,000 messages at
    mission scale, kept as long as their service and DestinationRule are unchanged. A protobuf
    message takes ~2.5-3 KB in memory (upb) for ~250-350 bytes of encoding, and the snapshot layer
    keeps the encoding anyway: as messages they held ~17 MB of pilot's steady RSS. Cost: the
    encoding is made here instead of in the snapshot layer (once per message either way); whoever
    reads a field parses (`as_message`), which only tools and tests do.
    """
    return {name: encoded(message) for name, message in messages.items()}


def as_message(value: Any) -> Any:
    """`value` as a protobuf message: parsed if it is `Encoded`, else itself."""
    return value.message() if isinstance(value, Encoded) else value
