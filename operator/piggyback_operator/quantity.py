"""Kubernetes resource quantities ("64Gi", "500m", "2") as numbers, for capacity arithmetic."""

from __future__ import annotations

import re

_SUFFIX = {
    "": 1, "m": 1e-3,
    "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip
_QUANTITY = re.compile(r"^([+-]?[0-9.]+)(?:[eE]([+-]?[0-9]+))?(m|k|Ki|Mi|Gi|Ti|Pi|Ei|M|G|T|P|E)?$")


def parse_quantity(value: str | int | float | None) -> float:
    """The quantity in base units (bytes, cores, devices); 0 for None or empty."""
    if value is None or value == "":
        return 0.0
    if isinstance(value, int | float):
        return float(value)
    match = _QUANTITY.match(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 64Gi, 500m, 2)")
    number, exponent, suffix = match.groups()
    return float(number) * (10 ** int(exponent) if exponent else 1) * _SUFFIX[suffix or ""]


def format_bytes(value: float) -> str:
    """Bytes as the largest binary suffix that keeps an integer (what a person would write in a spec)."""
    for suffix in ("Ti", "Gi", "Mi", "Ki"):
        unit = _SUFFIX[suffix]
        if value >= unit and value % unit == 0:
            return f"{int(value // unit)}{suffix}"
    return str(int(value))
