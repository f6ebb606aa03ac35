"""Reading back what a store holds: every value is untrusted input.

A disk file's header, a Redis chunk's header, a shared segment entry and a shared
module entry are JSON that another process (or another machine, or an attacker with
write access to the store) wrote.  They are parsed and checked field by field here,
and anything wrong is a `BadValue` naming the first wrong thing -- never another
exception -- which each reader turns into its own rejection (skipped and counted by
the tier, never raised into the engine).
"""

from __future__ import annotations

import json
from typing import Any


class BadValue(ValueError):
    """What is wrong with an untrusted value (the message says what)."""


def json_object(raw: bytes | str, what: str) -> dict:
    """`raw` decoded as a JSON object; BadValue ("`what` is not JSON", "... is a list,
    not an object") otherwise, however deep or malformed it is."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError, TypeError) as e:
        raise BadValue(f"{what} is not JSON ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise BadValue(f"{what} is a {type(data).__name__}, not an object")
    return data


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def field(body: dict, name: str, kind: type) -> Any:
    """body[name], which must be a `kind` (a bool is not an int)."""
    if name not in body:
        raise BadValue(f"{name} is missing")
    value = body[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadValue(f"{name} is a {type(value).__name__}, not a {kind.__name__}")
    return value


def int_field(body: dict, name: str, low: int, high: int) -> int:
    value = field(body, name, int)
    if not low <= value <= high:
        raise BadValue(f"{name} {value} outside [{low}, {high}]")
    return value


def hex_list(body: dict, name: str, nbytes: int) -> tuple[bytes, ...]:
    """body[name]: a list of `nbytes`-byte values written as hex strings."""
    out = []
    for item in field(body, name, list):
        if not isinstance(item, str) or len(item) != 2 * nbytes:
            raise BadValue(f"{name} holds something other than {nbytes}-byte hex strings")
        try:
            value = bytes.fromhex(item)
        except ValueError:
            value = b""
        if len(value) != nbytes:  # fromhex also skips spaces
            raise BadValue(f"{name} holds a string that is not {nbytes} bytes of hex")
        out.append(value)
    return tuple(out)
