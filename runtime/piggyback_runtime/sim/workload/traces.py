"""Trace files: reading them into `SimRequest`s and writing requests back.

Trace files (`kind: trace`, `read_trace`): the format is chosen by the suffix — `.csv` (header row) or
`.jsonl` / `.json-lines` (one JSON object a line; blank lines skipped). Columns (alternative names of one
column are accepted; a file that has two of them for the same column is an error):
- arrival time in seconds: `arrival_s` or `arrived_at` (optional, see the arrival rule below)
- service class: `class` or `service_class` (optional: the source's `class` is the default)
- service name: `service` (optional: the source's `service` is the default)
- prompt length: `input_tokens`, `prompt_tokens` or `num_prefill_tokens` (required)
- output length: `output_tokens` or `num_decode_tokens` (required)
- request id: `request_id` (optional; `read_trace` keeps it, `generate` renumbers)
Other columns are ignored (e.g. Vidur's `num_total_tokens`, `pd_ratio`). Token counts are positive integers
("374" or "374.0"). A bad row raises ValueError naming the file, the line number and the column.

Arrival rule for a trace source, in this order:
1. `rate_per_s` set: Poisson arrivals at that rate from start_s; the rows keep their file order (their lengths
   are used in order; any arrival column is ignored).
2. `batch: true`: every row arrives at start_s (evenly over `spread_s` when > 0).
3. otherwise the trace's arrival column, multiplied by `time_scale`, plus start_s. A trace with no arrival
   column (e.g. Vidur's arxiv_summarization_*.csv) is then an error that says to set `rate_per_s` or `batch`.
Rows past the source's end (start_s + duration_s) or the horizon are dropped; `limit` takes the first N rows
of the file; `max_prompt_tokens` / `max_output_tokens` clip lengths.
(The arrival rule is applied by generators.py; `read_trace` reads a file with its own arrivals.)
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from piggyback_runtime.config import ServiceClass
from piggyback_runtime.sim.workload.spec import CLASSES, SimRequest, clip_tokens

_ARRIVAL_COLUMNS = ("arrival_s", "arrived_at")
_CLASS_COLUMNS = ("class", "service_class")
_SERVICE_COLUMNS = ("service",)
_PROMPT_COLUMNS = ("input_tokens", "prompt_tokens", "num_prefill_tokens")
_OUTPUT_COLUMNS = ("output_tokens", "num_decode_tokens")
_ID_COLUMNS = ("request_id",)
_JSONL_SUFFIXES = (".jsonl", ".json-lines")


@dataclass(frozen=True, slots=True)
class TraceRow:
    line: int
    arrival_s: float | None
    service: str | None
    service_class: ServiceClass | None
    prompt_tokens: int
    output_tokens: int
    request_id: str | None


class _RowParser:
    """Turns one row (a dict of raw values) into a TraceRow; every error names file, line and column."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.has_arrival: bool | None = None  # fixed by the first row

    def _fail(self, line: int, column: str, problem: str) -> ValueError:
        return ValueError(f"{self.path}:{line}: column {column!r}: {problem}")

    def _column(self, row: dict[str, Any], names: Sequence[str], line: int) -> str | None:
        present = [name for name in names if name in row]
        if len(present) > 1:
            raise ValueError(f"{self.path}:{line}: columns {' and '.join(map(repr, present))} mean the same; keep one")
        return present[0] if present else None

    def _tokens(self, row: dict[str, Any], names: Sequence[str], line: int) -> int:
        column = self._column(row, names, line)
        if column is None:
            raise ValueError(f"{self.path}:{line}: no {' / '.join(names)} column (the token count is required)")
        raw = row[column]
        value: float
        try:
            if isinstance(raw, bool):
                raise ValueError
            value = float(raw.strip()) if isinstance(raw, str) else float(raw)
        except (TypeError, ValueError):
            raise self._fail(line, column, f"{raw!r} is not a number") from None
        if not math.isfinite(value) or value != int(value) or value < 1:
            raise self._fail(line, column, f"{raw!r} is not a positive integer token count")
        return int(value)

    def parse(self, row: dict[str, Any], line: int) -> TraceRow:
        arrival_column = self._column(row, _ARRIVAL_COLUMNS, line)
        if self.has_arrival is None:
            self.has_arrival = arrival_column is not None
        elif self.has_arrival != (arrival_column is not None):
            raise ValueError(
                f"{self.path}:{line}: {'no' if self.has_arrival else 'an'} arrival column "
                f"({' / '.join(_ARRIVAL_COLUMNS)}), unlike the first row: give it on every row or on none"
            )
        arrival: float | None = None
        if arrival_column is not None:
            raw = row[arrival_column]
            try:
                if isinstance(raw, bool):
                    raise ValueError
                arrival = float(raw.strip()) if isinstance(raw, str) else float(raw)
            except (TypeError, ValueError):
                raise self._fail(line, arrival_column, f"{raw!r} is not a number of seconds") from None
            if not math.isfinite(arrival) or arrival < 0:
                raise self._fail(line, arrival_column, f"{raw!r} is not a time >= 0 s")
        service_class: ServiceClass | None = None
        class_column = self._column(row, _CLASS_COLUMNS, line)
        if class_column is not None and row[class_column] not in ("", None):
            raw_class = row[class_column]
            if raw_class not in CLASSES:
                raise self._fail(line, class_column, f"{raw_class!r} is not LS or BE")
            service_class = raw_class
        service: str | None = None
        service_column = self._column(row, _SERVICE_COLUMNS, line)
        if service_column is not None and row[service_column] not in ("", None):
            if not isinstance(row[service_column], str):
                raise self._fail(line, service_column, f"{row[service_column]!r} is not a service name")
            service = row[service_column]
        request_id: str | None = None
        id_column = self._column(row, _ID_COLUMNS, line)
        if id_column is not None and row[id_column] not in ("", None):
            request_id = str(row[id_column])
        return TraceRow(
            line=line,
            arrival_s=arrival,
            service=service,
            service_class=service_class,
            prompt_tokens=self._tokens(row, _PROMPT_COLUMNS, line),
            output_tokens=self._tokens(row, _OUTPUT_COLUMNS, line),
            request_id=request_id,
        )


def read_rows(path: Path, limit: int | None) -> tuple[list[TraceRow], bool]:
    """The first `limit` rows of a trace file, and whether it has an arrival column."""
    suffix = path.suffix.lower()
    if suffix != ".csv" and suffix not in _JSONL_SUFFIXES:
        raise ValueError(f"{path}: unknown trace format {suffix or '(no suffix)'!r}; use .csv, .jsonl or .json-lines")
    if not path.is_file():
        raise ValueError(f"{path}: no such trace file")
    parser = _RowParser(path)
    rows: list[TraceRow] = []
    with path.open(newline="" if suffix == ".csv" else None, encoding="utf-8") as handle:
        for line, raw in _raw_rows(path, suffix, handle):
            if limit is not None and len(rows) >= limit:
                break
            rows.append(parser.parse(raw, line))
    return rows, bool(parser.has_arrival)


def _raw_rows(path: Path, suffix: str, handle: Iterable[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    if suffix == ".csv":
        reader = csv.DictReader(handle)  # type: ignore[arg-type]
        if reader.fieldnames is None:
            raise ValueError(f"{path}: empty CSV file (expected a header row)")
        for row in reader:
            if None in row:  # more cells than header columns
                raise ValueError(f"{path}:{reader.line_num}: more cells than the header has columns")
            yield reader.line_num, row
        return
    for line, text in enumerate(handle, start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{line}: not valid JSON: {exc.msg}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{line}: expected a JSON object per line, got {type(row).__name__}")
        yield line, row


def fill_defaults(
    row: TraceRow, path: Path, service: str | None, service_class: ServiceClass | None
) -> tuple[str, str]:
    """The row's (service, class), or the source's defaults where the row has none."""
    name = row.service or service
    klass = row.service_class or service_class
    if name is None:
        raise ValueError(f"{path}:{row.line}: no service on this row and no default service set")
    if klass is None:
        raise ValueError(f"{path}:{row.line}: no class on this row and no default class (LS or BE) set")
    return name, klass


def read_trace(
    path: str | Path,
    *,
    service: str | None = None,
    service_class: ServiceClass | None = None,
    time_scale: float = 1.0,
    limit: int | None = None,
    max_prompt_tokens: int | None = None,
    max_output_tokens: int | None = None,
) -> list[SimRequest]:
    """A trace file's requests in file order, arrivals from its arrival column times `time_scale`.

    `service` / `service_class` are defaults for rows without those columns. Request ids come from a
    `request_id` column, else f"{service}-{n}" in file order. A trace without an arrival column raises
    ValueError: use a `kind: trace` source with `rate_per_s` or `batch: true` in a WorkloadSpec instead.
    """
    path = Path(path)
    if not (math.isfinite(time_scale) and time_scale > 0):
        raise ValueError(f"time_scale must be a finite number > 0, got {time_scale!r}")
    rows, has_arrival = read_rows(path, limit)
    if rows and not has_arrival:
        raise no_arrival_error(path)
    requests: list[SimRequest] = []
    counters: dict[str, int] = {}
    seen: set[str] = set()
    for row in rows:
        name, klass = fill_defaults(row, path, service, service_class)
        request_id = row.request_id
        if request_id is None:
            request_id = f"{name}-{counters.get(name, 0)}"
            counters[name] = counters.get(name, 0) + 1
        if request_id in seen:
            raise ValueError(f"{path}:{row.line}: column 'request_id': {request_id!r} repeats an earlier row")
        seen.add(request_id)
        assert row.arrival_s is not None  # has_arrival: every row has one
        requests.append(
            SimRequest(
                arrival_s=row.arrival_s * time_scale,
                service=name,
                service_class=klass,  # type: ignore[arg-type]
                prompt_tokens=clip_tokens(row.prompt_tokens, 1, max_prompt_tokens),
                output_tokens=clip_tokens(row.output_tokens, 1, max_output_tokens),
                request_id=request_id,
            )
        )
    return requests


def no_arrival_error(path: Path) -> ValueError:
    return ValueError(
        f"{path}: the trace has no arrival column ({' / '.join(_ARRIVAL_COLUMNS)}); set rate_per_s on the "
        "trace source for Poisson arrivals, or batch: true for all rows at start_s"
    )


_TRACE_FIELDS = ("request_id", "arrival_s", "service", "class", "prompt_tokens", "output_tokens")


def _trace_record(request: SimRequest) -> dict[str, Any]:
    return {
        "request_id": request.request_id,
        "arrival_s": request.arrival_s,
        "service": request.service,
        "class": request.service_class,
        "prompt_tokens": request.prompt_tokens,
        "output_tokens": request.output_tokens,
    }


def write_trace_jsonl(requests: Iterable[SimRequest], path: str | Path) -> None:
    """Save requests so that read_trace(path) gives them back identically (floats in shortest round-trip form)."""
    with Path(path).open("w", encoding="utf-8") as handle:
        for request in requests:
            handle.write(json.dumps(_trace_record(request)) + "\n")


def write_trace_csv(requests: Iterable[SimRequest], path: str | Path) -> None:
    """As write_trace_jsonl, as CSV with a header row (str(float) is Python's round-trip repr)."""
    with Path(path).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=_TRACE_FIELDS)
        writer.writeheader()
        for request in requests:
            writer.writerow(_trace_record(request))
