"""Text that the shell mirrors write with jq alone, so both print the same bytes.

jq (1.6 and later) writes a number as the shortest decimal that reads back as the same
double, as Python's repr does, but without Python's ".0" on whole numbers; and JSON
with DEL escaped, other non-ASCII as it is.
"""
from __future__ import annotations

import json
from typing import Any


def number(value: float) -> str:
    """A number as jq writes it."""
    shown = repr(float(value))
    return shown[:-2] if shown.endswith(".0") else shown


def _whole_floats_as_ints(value: Any) -> Any:
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < 1e16 else value
    if isinstance(value, dict):
        return {key: _whole_floats_as_ints(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_whole_floats_as_ints(item) for item in value]
    return value


def dumps(value: Any, pretty: bool = False) -> str:
    """`jq -c .` (or with `pretty`, `jq .`) of `value`, without the newline."""
    text = json.dumps(_whole_floats_as_ints(value), ensure_ascii=False,
                      **({"indent": 2} if pretty else {"separators": (",", ":")}))
    return text.replace("\x7f", "\\u007f")
