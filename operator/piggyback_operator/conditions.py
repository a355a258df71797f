"""Status conditions per the Kubernetes API conventions: CamelCase reasons, human messages, transitions."""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"
ORDER = ("Admitted", "Placed", "RuntimeReady", "SLOMet")


@dataclass(frozen=True)
class Cond:
    type: str
    status: str
    reason: str
    message: str


def now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def find(conditions: Sequence[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions or () if c.get("type") == type_), None)


def is_true(conditions: Sequence[Mapping[str, Any]] | None, type_: str) -> bool:
    c = find(conditions, type_)
    return c is not None and c.get("status") == TRUE


def aggregate_ready(conds: Sequence[Cond]) -> Cond:
    """Ready: admitted, placed, a replica ready, and the SLO not known to be missed (Unknown does not block)."""
    for c in conds:
        blocking = c.status == FALSE if c.type == "SLOMet" else c.status != TRUE
        if blocking:
            return Cond("Ready", FALSE, c.reason, f"{c.type}: {c.message}")
    slo = next(c for c in conds if c.type == "SLOMet")
    return Cond("Ready", TRUE, "Ready", f"serving; {slo.message}")


def render(
    old: Sequence[Mapping[str, Any]] | None, conds: Sequence[Cond], generation: int | None
) -> list[dict[str, Any]]:
    """metav1.Condition dicts; lastTransitionTime moves only when the status flips."""
    out = []
    for c in conds:
        previous = find(old, c.type)
        if previous is not None and previous.get("status") == c.status:
            transition = previous.get("lastTransitionTime", now())
        else:
            transition = now()
        item: dict[str, Any] = {
            "type": c.type, "status": c.status, "reason": c.reason, "message": c.message,
            "lastTransitionTime": transition,
        }  # fmt: skip
        if generation is not None:
            item["observedGeneration"] = generation
        out.append(item)
    return out
