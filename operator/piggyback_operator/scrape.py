"""Scrape runtime pods' /metrics and turn them into per-service SLO figures.

Names come from piggyback_runtime.metrics (the one place they are spelled). Histograms are aggregated across
replicas by adding bucket counts before taking a quantile (quantiles themselves cannot be averaged), and over
the interval between two scrapes when that interval saw requests; otherwise over the runtime's lifetime.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from piggyback_runtime import metrics as m

Buckets = dict[float, float]  # upper bound -> cumulative count


@dataclass
class PodSample:
    """One scrape of one runtime pod."""

    at: float  # time.monotonic()
    ttft: dict[str, Buckets] = field(default_factory=dict)  # per service (model_name)
    tpot: dict[str, Buckets] = field(default_factory=dict)
    attainment: dict[str, float] = field(default_factory=dict)
    window_requests: dict[str, float] = field(default_factory=dict)
    generation_tokens: dict[str, float] = field(default_factory=dict)
    headroom_rps: float | None = None
    host_kv_free_bytes: float | None = None
    in_flight: float = 0.0  # running + waiting requests, all services: what a scale-down would have to drain


def parse_exposition(text: str, at: float) -> PodSample:
    sample = PodSample(at=at)
    histograms = {m.TTFT_SECONDS: sample.ttft, m.REQUEST_TPOT_SECONDS: sample.tpot}
    for family in text_string_to_metric_families(text):
        if family.name in histograms:
            target = histograms[family.name]
            for s in family.samples:
                if s.name.endswith("_bucket") and "model_name" in s.labels:
                    buckets = target.setdefault(s.labels["model_name"], {})
                    bound = float(s.labels["le"])
                    buckets[bound] = buckets.get(bound, 0.0) + s.value
        elif family.name == m.SLO_ATTAINMENT:
            sample.attainment.update({s.labels["model_name"]: s.value for s in family.samples})
        elif family.name == m.SLO_WINDOW_REQUESTS:
            sample.window_requests.update({s.labels["model_name"]: s.value for s in family.samples})
        elif family.name == m.GENERATION_TOKENS:
            for s in family.samples:
                if s.name.endswith("_total"):
                    name = s.labels.get("model_name", "")
                    sample.generation_tokens[name] = sample.generation_tokens.get(name, 0.0) + s.value
        elif family.name == m.LS_HEADROOM_RPS:
            sample.headroom_rps = sum(s.value for s in family.samples)
        elif family.name == m.HOST_KV_FREE_BYTES:
            sample.host_kv_free_bytes = sum(s.value for s in family.samples)
        elif family.name in (m.NUM_RUNNING, m.NUM_WAITING):
            sample.in_flight += sum(s.value for s in family.samples)
    return sample


def quantile(q: float, buckets: Buckets) -> float | None:
    """histogram_quantile over cumulative buckets, as PromQL computes it; None without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total = buckets[bounds[-1]]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):  # beyond the last finite bucket: report that bound, as Prometheus does
                finite = [b for b in bounds if not math.isinf(b)]
                return finite[-1] if finite else None
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return None


def _add(into: Buckets, other: Buckets, sign: float = 1.0) -> None:
    for bound, count in other.items():
        into[bound] = into.get(bound, 0.0) + sign * count


@dataclass(frozen=True)
class ServiceFigures:
    ttft_p99_s: float | None
    tpot_p99_s: float | None
    attainment: float | None
    window_requests: int | None
    tokens_per_second: float | None


@dataclass(frozen=True)
class PoolFigures:
    """What the pool's ready runtime pods report, aggregated; `pods` is how many answered."""

    at: float
    pods: int
    services: Mapping[str, ServiceFigures]
    headroom_rps: float | None  # None: no pod exports the headroom metric
    host_kv_free_bytes: float | None
    errors: tuple[str, ...] = ()
    failed: frozenset[str] = frozenset()  # endpoints that did not answer this scrape
    in_flight: Mapping[str, float] = field(default_factory=dict)  # per endpoint: running + waiting requests

    def service(self, name: str) -> ServiceFigures | None:
        return self.services.get(name)


def aggregate(now: dict[str, PodSample], before: Mapping[str, PodSample], at: float) -> PoolFigures:
    names: set[str] = set()
    for s in now.values():
        names |= set(s.ttft) | set(s.tpot) | set(s.attainment) | set(s.generation_tokens)
    services: dict[str, ServiceFigures] = {}
    for name in sorted(names):
        p99: dict[str, float | None] = {}
        for kind in ("ttft", "tpot"):
            lifetime: Buckets = {}
            recent: Buckets = {}
            for pod, sample in now.items():
                current = getattr(sample, kind).get(name, {})
                _add(lifetime, current)
                _add(recent, current)
                if pod in before:
                    _add(recent, getattr(before[pod], kind).get(name, {}), sign=-1.0)
            use_recent = bool(before) and recent and max(recent.values()) > 0
            p99[kind] = quantile(0.99, recent if use_recent else lifetime)
        weights = [(s.attainment[name], s.window_requests.get(name, 0.0)) for s in now.values() if name in s.attainment]
        window = sum(w for _, w in weights)
        attainment = (
            None if not weights
            else sum(a * w for a, w in weights) / window if window > 0
            else min(a for a, _ in weights)
        )  # fmt: skip
        rate = None
        for pod, sample in now.items():
            if pod in before and name in sample.generation_tokens:
                elapsed = sample.at - before[pod].at
                previous = before[pod].generation_tokens.get(name, 0.0)
                produced = sample.generation_tokens[name] - previous
                if produced < 0:  # counter reset: the pod restarted
                    produced = sample.generation_tokens[name]
                if elapsed > 0:
                    rate = (rate or 0.0) + produced / elapsed
        services[name] = ServiceFigures(
            ttft_p99_s=p99["ttft"], tpot_p99_s=p99["tpot"], attainment=attainment,
            window_requests=int(window) if weights else None, tokens_per_second=rate,
        )  # fmt: skip
    headrooms = [s.headroom_rps for s in now.values() if s.headroom_rps is not None]
    kv_free = [s.host_kv_free_bytes for s in now.values() if s.host_kv_free_bytes is not None]
    return PoolFigures(
        at=at, pods=len(now), services=services,
        headroom_rps=sum(headrooms) if headrooms else None,
        host_kv_free_bytes=sum(kv_free) if kv_free else None,
        in_flight={endpoint: sample.in_flight for endpoint, sample in now.items()},
    )  # fmt: skip


StageRange = tuple[int, int | None]  # lower, upper tokens (None: the last, unbounded stage)


def parse_router_stages(text: str) -> dict[str, StageRange]:
    """host:port of each replica -> the length range of its stage, from a lengthAware router's /metrics (the
    plan in use now: the router refines and re-plans its stages as request lengths change)."""
    lower: dict[str, int] = {}
    upper: dict[str, int] = {}
    replica_stage: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        if family.name == m.ROUTER_STAGE_LOWER_TOKENS:
            lower.update({s.labels["stage"]: int(s.value) for s in family.samples})
        elif family.name == m.ROUTER_STAGE_UPPER_TOKENS:
            upper.update({s.labels["stage"]: int(s.value) for s in family.samples})
        elif family.name == m.ROUTER_REPLICA_QUEUE:
            for s in family.samples:
                url = urlsplit(s.labels["replica"])
                replica_stage[f"{url.hostname}:{url.port}"] = s.labels["stage"]
    return {replica: (lower[stage], upper.get(stage)) for replica, stage in replica_stage.items() if stage in lower}


class PoolScraper:
    """Scrapes a pool's pods at most once per `min_interval_s`, whichever service's timer asks first."""

    def __init__(self, min_interval_s: float, timeout_s: float = 5.0) -> None:
        self.min_interval_s = min_interval_s
        self.timeout_s = timeout_s
        self._last: dict[str, dict[str, PodSample]] = {}
        self._figures: dict[str, PoolFigures] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def latest(self, pool: str) -> PoolFigures | None:
        return self._figures.get(pool)

    async def figures(self, pool: str, endpoints: Iterable[str], force: bool = False) -> PoolFigures:
        """Figures of the pool from `endpoints` (host:port of ready pods)."""
        endpoints = sorted(endpoints)
        async with self._locks.setdefault(pool, asyncio.Lock()):
            cached = self._figures.get(pool)
            fresh = cached is not None and time.monotonic() - cached.at < self.min_interval_s
            same_pods = cached is not None and set(self._last.get(pool, {})) == set(endpoints)
            if fresh and same_pods and not force:
                assert cached is not None
                return cached
            if self._session is None:
                self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
            results = await asyncio.gather(*(self._scrape(e) for e in endpoints), return_exceptions=True)
            now: dict[str, PodSample] = {}
            errors: list[str] = []
            failed: set[str] = set()
            for endpoint, result in zip(endpoints, results, strict=True):
                if isinstance(result, BaseException):
                    errors.append(f"{endpoint}: {type(result).__name__}: {result}".rstrip(": "))
                    failed.add(endpoint)
                else:
                    now[endpoint] = result
            at = time.monotonic()
            figures = aggregate(now, self._last.get(pool, {}), at)
            figures = PoolFigures(**{**figures.__dict__, "errors": tuple(errors), "failed": frozenset(failed)})
            self._last[pool] = {**{k: v for k, v in self._last.get(pool, {}).items() if k in endpoints}, **now}
            self._figures[pool] = figures
            return figures

    async def router_stages(self, endpoint: str) -> dict[str, StageRange]:
        """The stage plan a lengthAware router at `endpoint` (host:port) routes by."""
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        async with self._session.get(f"http://{endpoint}/metrics") as response:
            response.raise_for_status()
            return parse_router_stages(await response.text())

    async def _scrape(self, endpoint: str) -> PodSample:
        assert self._session is not None
        async with self._session.get(f"http://{endpoint}/metrics") as response:
            response.raise_for_status()
            text = await response.text()
        return parse_exposition(text, at=time.monotonic())
