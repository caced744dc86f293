"""Protobuf wire-format helpers for assembling discovery responses from pre-encoded parts.

Serialize once, send many: every resource is encoded once per snapshot, and a response to a
stream is the concatenation of cached field encodings plus that stream's nonce. Protobuf
parsers merge concatenated encodings of one message, so the result is an ordinary message.
"""

from __future__ import annotations

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


def len_field(field_number: int, payload: bytes) -> bytes:
    """One length-delimited field (string, bytes or sub-message) with its tag."""
    return varint(field_number << 3 | _LEN) + varint(len(payload)) + payload


def str_field(field_number: int, text: str) -> bytes:
    """A string field; empty strings are omitted as proto3 does."""
    return len_field(field_number, text.encode()) if text else b""


def _after_len_field(data: bytes, pos: int) -> int:
    """Where a length-delimited field ends, given the position just after its tag."""
    length, shift = 0, 0
    while True:
        byte = data[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            return pos + length
        shift += 7


def request_names_key(raw: bytes, nonce: str) -> bytes | None:
    """The bytes of a serialized DiscoveryRequest from its resource names up to its nonce.

    Envoy (like every protobuf encoder) writes fields in number order: version_info (1), node
    (2), resource_names (3), type_url (4), response_nonce (5), error_detail (6). The slice between
    the node and the nonce therefore holds exactly the subscribed names and the type, so two
    requests subscribe to the same names if these bytes are equal, whatever version or nonce
    they carry. None when the layout is anything else (a NACK, another encoder): the caller then
    reads the names the ordinary way.
    """
    try:
        pos = _after_len_field(raw, 1) if raw[:1] == b"\x0a" else 0
        if raw[pos:pos + 1] == b"\x12":
            pos = _after_len_field(raw, pos + 1)
    except IndexError:
        return None
    tail = str_field(5, nonce)
    if not raw.endswith(tail) or pos > len(raw) - len(tail):
        return None
    return raw[pos:len(raw) - len(tail)]
