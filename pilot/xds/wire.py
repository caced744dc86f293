"""Protobuf wire-format helpers for assembling discovery responses from pre-encoded parts.

Serialize once, send many: every resource is encoded once per snapshot, and a response to a
stream is the concatenation of cached field encodings plus that stream's nonce. Protobuf
parsers merge concatenated encodings of one message, so the result is an ordinary message.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

_LEN = 2  # wire type of length-delimited fields


def varint(value: int) -> bytes:
    """Base-128 varint of a non-negative int."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def len_header(field_number: int, size: int) -> bytes:
    """The tag and length of a length-delimited field of `size` bytes: what precedes its payload
    (for payloads joined from pieces, whose bytes are not copied to be framed)."""
    return varint(field_number << 3 | _LEN) + varint(size)


def len_field(field_number: int, payload: bytes) -> bytes:
    """One length-delimited field (string, bytes or sub-message) with its tag."""
    return len_header(field_number, len(payload)) + payload


def str_field(field_number: int, text: str) -> bytes:
    """A string field; empty strings are omitted as proto3 does."""
    return len_field(field_number, text.encode()) if text else b""


def _len_field_bounds(data: bytes, pos: int) -> tuple[int, int]:
    """Where a length-delimited field's payload starts and ends, given the position just after its
    tag. ValueError when the length is cut off."""
    length, start = varint_at(data, pos)
    return start, start + length


def _after_len_field(data: bytes, pos: int) -> int:
    """Where a length-delimited field ends, given the position just after its tag."""
    return _len_field_bounds(data, pos)[1]


def names_region(raw: bytes, type_fields: Mapping[bytes, str]) -> tuple[int, int, str] | None:
    """Where a serialized DiscoveryRequest's resource names and type are: (start, end, type URL).

    Envoy (like every protobuf encoder) writes fields in number order: version_info (1), node
    (2), resource_names (3), type_url (4), response_nonce (5), error_detail (6). The region from
    the first name to the end of the type field therefore holds exactly the subscribed names
    and the type: two requests subscribe to the same names if these bytes are equal, whatever
    version, nonce or error they carry. `type_fields` maps each known type's encoded field to
    its URL; the last one in `raw` ends the region. None when no known type is found.
    """
    try:
        start = _after_len_field(raw, 1) if raw[:1] == b"\x0a" else 0
        if raw[start:start + 1] == b"\x12":
            start = _after_len_field(raw, start + 1)
    except ValueError:
        return None
    for encoded, type_url in type_fields.items():
        at = raw.rfind(encoded, start)
        if at >= 0:
            return start, at + len(encoded), type_url
    return None


def subscribe_tail(raw: bytes) -> tuple[int, str] | None:
    """Where a serialized DeltaDiscoveryRequest's fields after its type begin, and the type URL.

    Encoders write fields in number order: node (1), type_url (2), resource_names_subscribe (3),
    then unsubscribe (4), initial versions (5), nonce (6), error (7). Everything from the returned
    offset on is what the request asks besides naming itself and its type; two requests whose
    tails are equal bytes ask the same. None without a type field right after the node.
    """
    try:
        pos = _after_len_field(raw, 1) if raw[:1] == b"\x0a" else 0
        if raw[pos:pos + 1] != b"\x12":
            return None
        start, end = _len_field_bounds(raw, pos + 1)
    except ValueError:
        return None
    if end > len(raw):
        return None
    return end, raw[start:end].decode("utf-8", "replace")


# The response_nonce field's tag in each protocol's request: DeltaDiscoveryRequest (6), DiscoveryRequest (5).
DELTA_NONCE, SOTW_NONCE = b"\x32", b"\x2a"


def ack_nonce(raw: bytes, start: int, tag: bytes = DELTA_NONCE) -> str | None:
    """The nonce of a serialized request whose fields from `start` on are a response_nonce and
    nothing else. For a DeltaDiscoveryRequest, `start` is what `subscribe_tail` returns: such a
    request is a plain ACK, which names its type and the response it acknowledges, subscribes to
    nothing and carries no error. For a DiscoveryRequest (`tag` SOTW_NONCE), `start` is the end of
    what `names_region` finds: no error and nothing after the names and type.
    None for anything else, an empty nonce or one that is not UTF-8 (the parser's to refuse)."""
    if raw[start:start + 1] != tag:
        return None
    try:
        begin, end = _len_field_bounds(raw, start + 1)
        if end != len(raw):
            return None
        return raw[begin:end].decode() or None
    except ValueError:  # a cut-off length, or a nonce that is not UTF-8
        return None


def fields(data: bytes) -> Iterator[tuple[int, int, int, int]]:
    """Each top-level field of an encoded message: (number, start, end, payload start); for a
    length-delimited field the payload is data[payload:end]. ValueError on a malformed encoding.
    For splitting a message by field without parsing it (`pilot.translate.vhds`)."""
    pos, size = 0, len(data)
    while pos < size:
        start = pos
        key, pos = varint_at(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            _, pos = varint_at(data, pos)
            payload = pos
        elif wire_type == 2:
            length, payload = varint_at(data, pos)
            pos = payload + length
        elif wire_type == 1:
            pos = payload = pos + 8
        elif wire_type == 5:
            pos = payload = pos + 4
        else:
            raise ValueError(f"unsupported wire type {wire_type} at byte {start}")
        if pos > size or number == 0:
            raise ValueError(f"truncated or invalid field at byte {start}")
        yield number, start, pos, payload


def varint_at(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at `pos` and where it ends."""
    value, shift = 0, 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
