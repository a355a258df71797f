"""Simulator workloads: arrival processes, length models, trace files and spec errors (sim/workload/)."""

from __future__ import annotations

import itertools
import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from piggyback_runtime.sim.workload import (
    SimRequest,
    WorkloadSpec,
    generate,
    load_workload,
    read_trace,
    write_trace_csv,
    write_trace_jsonl,
)

VIDUR = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "vidur"
SPLITWISE = VIDUR / "processed_traces" / "splitwise_conv.csv"
ARXIV = VIDUR / "processed_traces" / "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv"
needs_vidur = pytest.mark.skipif(
    not VIDUR.is_dir(), reason=f"Vidur traces not found at {VIDUR} (the shared data folder next to the repo)"
)

CHAT_LENGTHS = {"kind": "fixed", "prompt_tokens": 100, "output_tokens": 20}


def _spec(*sources: dict[str, Any], duration_s: float = 100.0, seed: int = 0) -> WorkloadSpec:
    return load_workload({"seed": seed, "duration_s": duration_s, "sources": list(sources)}, "test")


def _source(kind: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"kind": kind, "service": "chat", "class": "LS"}
    if kind != "trace":
        base["lengths"] = CHAT_LENGTHS
    return {**base, **fields}


def _per_second_counts(requests: list[SimRequest], duration_s: int) -> list[int]:
    counts = Counter(int(r.arrival_s) for r in requests)
    return [counts.get(second, 0) for second in range(duration_s)]


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(ValueError) as info:
        load_workload(data, "workload.yaml")
    return str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# Arrival processes


def test_poisson_count_and_interarrival_match_the_rate() -> None:
    requests = generate(_spec(_source("poisson", rate_per_s=50), duration_s=200))
    # 10,000 expected with standard deviation 100: 3 % is three standard deviations.
    assert abs(len(requests) - 10_000) <= 300
    gaps = [b.arrival_s - a.arrival_s for a, b in itertools.pairwise(requests)]
    assert statistics.mean(gaps) == pytest.approx(1 / 50, rel=0.03)
    # Exponential gaps: the standard deviation equals the mean (a fixed-rate clock would give ~0).
    assert statistics.stdev(gaps) == pytest.approx(1 / 50, rel=0.05)
    assert all(0 <= r.arrival_s < 200 for r in requests)


def test_bursty_keeps_the_mean_rate_but_is_more_variable_than_poisson() -> None:
    bursty = _source("bursty", rate_per_s=20, burst_factor=6, burst_duration_s=2, period_s=10)
    bursty_requests = generate(_spec(bursty, duration_s=300))
    poisson_requests = generate(_spec(_source("poisson", rate_per_s=20), duration_s=300))
    assert len(bursty_requests) == pytest.approx(20 * 300, rel=0.05)
    bursty_var = statistics.variance(_per_second_counts(bursty_requests, 300))
    poisson_var = statistics.variance(_per_second_counts(poisson_requests, 300))
    # Poisson per-second counts have variance ≈ mean (20); the on/off rate adds its own variance on top.
    assert poisson_var == pytest.approx(20, rel=0.3)
    assert bursty_var > 3 * poisson_var
    # Bursts are the first 2 s of every 10 s period: those seconds carry most of the traffic.
    in_burst = sum(1 for r in bursty_requests if r.arrival_s % 10 < 2)
    assert in_burst > 0.6 * len(bursty_requests)


def test_diurnal_rate_follows_the_sine() -> None:
    diurnal = _source("diurnal", min_rate_per_s=2, max_rate_per_s=20, period_s=100)
    requests = generate(_spec(diurnal, duration_s=400))
    # The mean of the sine is the midpoint of min and max: 11/s over 400 s.
    assert len(requests) == pytest.approx(11 * 400, rel=0.05)
    peak = sum(1 for r in requests if r.arrival_s % 100 < 50)
    trough = len(requests) - peak
    # Expected halves: (11 + 9 * 2/π) and (11 - 9 * 2/π) per second, a ratio of about 3.
    assert peak > 2.5 * trough


def test_batch_arrives_at_start_or_spread_evenly() -> None:
    at_once = generate(_spec(_source("batch", count=5, start_s=10, service="jobs", **{"class": "BE"})))
    assert [r.arrival_s for r in at_once] == [10.0] * 5
    assert [r.request_id for r in at_once] == [f"jobs-{n}" for n in range(5)]
    spread = generate(_spec(_source("batch", count=4, start_s=10, spread_s=8)))
    assert [r.arrival_s for r in spread] == [10.0, 12.0, 14.0, 16.0]


def test_sources_are_merged_sorted_with_unique_ids_and_stop_at_their_end() -> None:
    spec = _spec(
        _source("poisson", rate_per_s=5, start_s=20, duration_s=30),
        _source("poisson", rate_per_s=5, service="other"),
        _source("batch", count=3, start_s=50, service="chat"),
        duration_s=60,
    )
    requests = generate(spec)
    arrivals = [r.arrival_s for r in requests]
    assert arrivals == sorted(arrivals)
    assert len({r.request_id for r in requests}) == len(requests)
    first_source = [r for r in requests if r.service == "chat" and r.arrival_s != 50.0]
    assert first_source and all(20 <= r.arrival_s < 50 for r in first_source)
    assert all(r.arrival_s < 60 for r in requests)
    # Ids count each service in arrival order, across the sources that share it.
    chat = [r.request_id for r in requests if r.service == "chat"]
    assert chat == [f"chat-{n}" for n in range(len(chat))]


# ---------------------------------------------------------------------------------------------------------------
# Lengths


def _batch_lengths(lengths: dict[str, Any], count: int = 20_000) -> tuple[list[int], list[int]]:
    requests = generate(_spec(_source("batch", count=count, lengths=lengths)))
    return [r.prompt_tokens for r in requests], [r.output_tokens for r in requests]


def test_lognormal_means_hold_after_clipping() -> None:
    lengths = {
        "kind": "lognormal",
        "mean_prompt_tokens": 800,
        "mean_output_tokens": 120,
        "sigma_prompt": 1.2,
        "sigma_output": 0.8,
        "min_prompt_tokens": 16,
        "max_prompt_tokens": 2000,
        "max_output_tokens": 400,
    }
    prompts, outputs = _batch_lengths(lengths)
    # A σ=1.2 lognormal with mean 800 has ~14 % of its mass above 2000; without solving μ for the clipped
    # mean, the sample mean would come out near 620, far outside these bounds.
    assert statistics.mean(prompts) == pytest.approx(800, rel=0.05)
    assert statistics.mean(outputs) == pytest.approx(120, rel=0.05)
    assert min(prompts) >= 16 and max(prompts) <= 2000 and max(outputs) <= 400
    assert max(prompts) == 2000  # the clip is reached: the test exercises clipping


def test_longbench_preset_matches_the_paper_means_under_the_12k_cap() -> None:
    prompts, outputs = _batch_lengths({"kind": "preset", "name": "longbench-v2"})
    # OmniServe: 8,952 / 136 mean, max context 12K. The preset's 12,000 cap alone would pull a plain lognormal
    # fit ~3 % low; μ is solved for the clipped mean, so it lands within sampling noise (asserted within 2 %).
    assert max(prompts) <= 12_000
    assert statistics.mean(prompts) == pytest.approx(8952, rel=0.02)
    assert statistics.mean(outputs) == pytest.approx(136, rel=0.05)


@pytest.mark.parametrize(
    ("name", "prompt_mean", "output_mean"), [("dailymail", 1964, 397), ("sharegpt-like", 300, 250)]
)
def test_other_presets_keep_their_means(name: str, prompt_mean: float, output_mean: float) -> None:
    prompts, outputs = _batch_lengths({"kind": "preset", "name": name})
    assert statistics.mean(prompts) == pytest.approx(prompt_mean, rel=0.05)
    assert statistics.mean(outputs) == pytest.approx(output_mean, rel=0.05)


# ---------------------------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_same_requests_different_seed_different() -> None:
    sources = (
        _source("poisson", rate_per_s=5, lengths={"kind": "preset", "name": "sharegpt-like"}),
        _source("diurnal", min_rate_per_s=1, max_rate_per_s=4, period_s=30, service="be", **{"class": "BE"}),
    )
    first = generate(_spec(*sources, seed=7))
    assert first == generate(_spec(*sources, seed=7))
    assert first != generate(_spec(*sources, seed=8))


def test_adding_a_source_or_changing_lengths_leaves_the_rest_alone() -> None:
    chat = _source("poisson", rate_per_s=5, lengths={"kind": "preset", "name": "sharegpt-like"})
    alone = generate(_spec(chat))
    with_batch = generate(_spec(chat, _source("batch", count=50, start_s=3, service="jobs", **{"class": "BE"})))
    assert [r for r in with_batch if r.service == "chat"] == alone
    # Arrival times come from their own stream: other lengths, same times.
    other_lengths = generate(_spec({**chat, "lengths": CHAT_LENGTHS}))
    assert [r.arrival_s for r in other_lengths] == [r.arrival_s for r in alone]
    # The per-source seed offset re-rolls only that source.
    assert generate(_spec({**chat, "seed": 1})) != alone


# ---------------------------------------------------------------------------------------------------------------
# Trace files


@needs_vidur
def test_reads_the_splitwise_conversation_trace() -> None:
    requests = read_trace(SPLITWISE, service="chat", service_class="LS")
    assert len(requests) == 19_366
    first = requests[0]
    assert (first.arrival_s, first.prompt_tokens, first.output_tokens) == (0.0, 374, 44)
    assert first.request_id == "chat-0" and first.service_class == "LS"
    # As a workload source: trace arrivals kept, rows past the horizon dropped, lengths clipped.
    spec = _spec(_source("trace", path=str(SPLITWISE), max_prompt_tokens=4096), duration_s=600)
    generated = generate(spec)
    assert len(generated) == sum(1 for r in requests if r.arrival_s < 600)
    assert max(r.prompt_tokens for r in generated) == 4096
    assert (generated[0].arrival_s, generated[0].prompt_tokens) == (0.0, 374)


@needs_vidur
def test_splitwise_lengths_with_poisson_arrivals() -> None:
    spec = _spec(_source("trace", path=str(SPLITWISE), rate_per_s=2), duration_s=300)
    requests = generate(spec)
    assert len(requests) == pytest.approx(600, rel=0.15)
    # Lengths in file order: the first rows of the trace.
    head = read_trace(SPLITWISE, service="chat", service_class="LS", limit=3)
    assert [(r.prompt_tokens, r.output_tokens) for r in requests[:3]] == [
        (r.prompt_tokens, r.output_tokens) for r in head
    ]


@needs_vidur
def test_a_trace_without_arrivals_needs_a_rate_or_a_batch() -> None:
    no_rate = _spec(_source("trace", path=str(ARXIV), service="summaries", **{"class": "BE"}))
    with pytest.raises(ValueError, match=r"no arrival column.*set rate_per_s"):
        generate(no_rate)
    with pytest.raises(ValueError, match="set rate_per_s"):
        read_trace(ARXIV, service="summaries", service_class="BE")
    batch = generate(_spec(_source("trace", path=str(ARXIV), batch=True, limit=100, start_s=5, **{"class": "BE"})))
    assert len(batch) == 100 and {r.arrival_s for r in batch} == {5.0}
    assert (batch[0].prompt_tokens, batch[0].output_tokens) == (3772, 54)
    rate = generate(_spec(_source("trace", path=str(ARXIV), rate_per_s=10, **{"class": "BE"}), duration_s=50))
    assert len(rate) == pytest.approx(500, rel=0.15)


def test_trace_options_scale_limit_offset_and_fill_defaults(tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text(
        '{"arrival_s": 1.0, "prompt_tokens": 10, "output_tokens": 5}\n'
        "\n"
        '{"arrival_s": 2.0, "prompt_tokens": 3000, "output_tokens": 5, "service": "other", "class": "BE"}\n'
        '{"arrival_s": 3.0, "prompt_tokens": 10, "output_tokens": 5}\n'
        '{"arrival_s": 40.0, "prompt_tokens": 10, "output_tokens": 5}\n'
    )
    source = _source("trace", path="t.jsonl", time_scale=2, start_s=1, limit=3, max_prompt_tokens=1000)
    requests = generate(_spec(source, duration_s=6.5), base_dir=tmp_path)  # relative path: base_dir
    assert [(r.arrival_s, r.service, r.service_class, r.prompt_tokens) for r in requests] == [
        (3.0, "chat", "LS", 10),
        (5.0, "other", "BE", 1000),
    ]  # the third row arrives at 7.0, past the 6.5 s horizon; the fourth is beyond the limit


def test_a_row_without_service_needs_a_default(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("arrival_s,prompt_tokens,output_tokens\n0,10,5\n")
    with pytest.raises(ValueError, match=r"t\.csv:2: no service"):
        read_trace(path, service_class="LS")


def test_generated_workloads_round_trip_through_jsonl_and_csv(tmp_path: Path) -> None:
    spec = _spec(
        _source("poisson", rate_per_s=3, lengths={"kind": "preset", "name": "sharegpt-like"}),
        _source("batch", count=20, start_s=1.5, spread_s=3, service="jobs", **{"class": "BE"}),
        duration_s=30,
    )
    requests = generate(spec)
    assert len(requests) > 50
    write_trace_jsonl(requests, tmp_path / "w.jsonl")
    write_trace_csv(requests, tmp_path / "w.csv")
    assert read_trace(tmp_path / "w.jsonl") == requests
    assert read_trace(tmp_path / "w.csv") == requests
    # And the saved file is a trace source that regenerates the same workload.
    again = generate(_spec(_source("trace", path="w.csv"), duration_s=30), base_dir=tmp_path)
    assert again == requests


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        (
            "neg.csv",
            "arrived_at,num_prefill_tokens,num_decode_tokens\n0,10,5\n1,10,-3\n",
            r"neg\.csv:3: column 'num_decode_tokens'",
        ),
        (
            "nan.csv",
            "arrived_at,num_prefill_tokens,num_decode_tokens\n0,ten,5\n",
            r"nan\.csv:2: column 'num_prefill_tokens': 'ten' is not a number",
        ),
        ("frac.csv", "arrival_s,input_tokens,output_tokens\n0,10.5,5\n", r"frac\.csv:2: column 'input_tokens'"),
        ("time.csv", "arrival_s,input_tokens,output_tokens\n0,10,5\nsoon,10,5\n", r"time\.csv:3: column 'arrival_s'"),
        (
            "cls.jsonl",
            '{"arrival_s": 0, "prompt_tokens": 1, "output_tokens": 1, "class": "XX"}\n',
            r"cls\.jsonl:1: column 'class'",
        ),
        (
            "neg.jsonl",
            '\n{"arrival_s": 0, "prompt_tokens": 1, "output_tokens": -1}\n',
            r"neg\.jsonl:2: column 'output_tokens'",
        ),
        ("bad.jsonl", '{"arrival_s": 0,\n', r"bad\.jsonl:1: not valid JSON"),
        ("none.csv", "arrival_s,output_tokens\n0,5\n", r"none\.csv:2: no input_tokens / prompt_tokens"),
        ("two.csv", "arrival_s,arrived_at,prompt_tokens,output_tokens\n0,0,1,1\n", r"'arrival_s' and 'arrived_at'"),
        ("trace.txt", "arrival_s,prompt_tokens,output_tokens\n", r"unknown trace format '\.txt'"),
    ],
)
def test_bad_trace_rows_name_file_line_and_column(tmp_path: Path, name: str, text: str, expected: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=expected):
        read_trace(path, service="chat", service_class="LS")


def test_a_missing_trace_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such trace file"):
        generate(_spec(_source("trace", path="absent.csv")), base_dir=tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Spec errors and SimRequest checks


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        (_source("poisson", rate_per_sec=5), "sources.0.rate_per_sec: unknown field"),
        (_source("poisson", rate_per_s=0), "sources.0.rate_per_s: Input should be greater than 0"),
        (
            _source("poisson", rate_per_s=1, lengths={"kind": "fixed", "prompt_tokens": 1, "output": 1}),
            "sources.0.lengths.output: unknown field",
        ),
        (
            _source("poisson", rate_per_s=1, lengths={"kind": "preset", "name": "alpaca"}),
            "sources.0.lengths.name: Input should be",
        ),
        (_source("poisson", rate_per_s=1, **{"class": "XX"}), "sources.0.class: Input should be 'LS' or 'BE'"),
        (_source("sawtooth"), "sources.0: Input tag 'sawtooth' found using 'kind' does not match"),
        (_source("bursty", rate_per_s=1, burst_factor=2, burst_duration_s=5, period_s=5), "shorter than period_s"),
        (_source("trace", path="a.csv", rate_per_s=1, batch=True), "not both"),
        (_source("trace", path="a.csv", rate_per_s=1, time_scale=2), "time_scale scales"),
        (_source("poisson", rate_per_s=1, start_s=100), "sources.0.start_s (100.0) is at or past"),
        (
            _source(
                "poisson",
                rate_per_s=1,
                lengths={
                    "kind": "lognormal",
                    "mean_prompt_tokens": 50,
                    "mean_output_tokens": 5,
                    "max_prompt_tokens": 40,
                },
            ),
            "mean_prompt_tokens (50.0) must lie strictly between",
        ),
    ],
)
def test_bad_specs_name_the_dotted_field(source: dict[str, Any], expected: str) -> None:
    message = _error({"duration_s": 100, "sources": [source]})
    assert message.startswith("workload.yaml: invalid workload spec")
    assert expected in message


def test_spec_level_errors() -> None:
    assert "sources: List should have at least 1 item" in _error({"duration_s": 10, "sources": []})
    assert "duration_s: Field required" in _error({"sources": [_source("poisson", rate_per_s=1)]})
    assert "speed: unknown field" in _error(
        {"duration_s": 10, "speed": 1, "sources": [_source("poisson", rate_per_s=1)]}
    )


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"prompt_tokens": 0}, "prompt_tokens must be an integer >= 1"),
        ({"output_tokens": 0}, "output_tokens must be an integer >= 1"),
        ({"arrival_s": -1.0}, "arrival_s must be"),
        ({"service_class": "XX"}, "service_class must be 'LS' or 'BE'"),
    ],
)
def test_sim_request_rejects_bad_values_naming_the_field(fields: dict[str, Any], expected: str) -> None:
    good = {
        "arrival_s": 0.0,
        "service": "chat",
        "service_class": "LS",
        "prompt_tokens": 1,
        "output_tokens": 1,
        "request_id": "chat-0",
    }
    with pytest.raises(ValueError, match=expected):
        SimRequest(**{**good, **fields})


def test_the_spec_accepts_json_shaped_data() -> None:
    data = json.loads(
        '{"seed": 3, "duration_s": 10, "sources": [{"kind": "poisson", "service": "chat", "class": "LS",'
        ' "rate_per_s": 2, "lengths": {"kind": "fixed", "prompt_tokens": 8, "output_tokens": 4}}]}'
    )
    spec = load_workload(data, "inline")
    assert spec.seed == 3 and spec.sources[0].service_class == "LS"
    assert all((r.prompt_tokens, r.output_tokens) == (8, 4) for r in generate(spec))
