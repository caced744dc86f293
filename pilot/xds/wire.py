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
