"""Hybrid placement's mode: every BE decode on the host path where the host's DRAM carries all the BE decode the
accelerator's prefill feeds (host-only), HBM-first where it does not (scheduler/be_mode.py)."""

from __future__ import annotations

import pytest

from piggyback_runtime.scheduler.be_mode import (
    HOST_ONLY_ENTER_RATIO,
    HOST_ONLY_LEAVE_RATIO,
    MODE_PERIOD_S,
    HostPathCapacity,
    be_decode_supply_tokens_s,
    host_only_mode,
)
from piggyback_runtime.scheduler.planner import Planner
from tests.runtime.test_hybrid_planner import _add, _planner, _prefill, _ran, _request


def test_host_only_is_entered_above_the_band_and_left_below_it() -> None:
    assert host_only_mode(HOST_ONLY_ENTER_RATIO * 100, 100, host_only_now=False)
    assert not host_only_mode(HOST_ONLY_ENTER_RATIO * 100 - 1, 100, host_only_now=False)
    # Inside the band the mode stays as it is, either way.
    inside = (HOST_ONLY_ENTER_RATIO + HOST_ONLY_LEAVE_RATIO) / 2 * 100
    assert host_only_mode(inside, 100, host_only_now=True)
    assert not host_only_mode(inside, 100, host_only_now=False)
    assert not host_only_mode(HOST_ONLY_LEAVE_RATIO * 100 - 1, 100, host_only_now=True)


def test_without_a_measured_supply_the_mode_does_not_change() -> None:
    assert host_only_mode(10.0, 0.0, host_only_now=True)
    assert not host_only_mode(10.0, 0.0, host_only_now=False)


def test_the_host_path_carries_its_bandwidth_over_a_rows_kv_per_token() -> None:
    capacity = HostPathCapacity(attention_b_s=320e9, kv_bytes_per_token=131072)  # 8B: 128 KiB of KV a token
    assert capacity.decode_tokens_s(2180) == pytest.approx(320e9 / (131072 * 2180))  # ~1,120 tok/s


def test_the_supply_is_the_be_work_per_second_times_the_output_share_of_a_be_request() -> None:
    # 12,000 BE tokens in 2 s; prompts of 1,600 tokens with 400 out: a fifth of the work becomes output tokens.
    assert be_decode_supply_tokens_s(12_000, 2.0, 1600, 400) == pytest.approx(1200)
    assert be_decode_supply_tokens_s(12_000, 0.0, 1600, 400) == 0.0  # nothing ran: no supply measured


@pytest.mark.parametrize("figures", [(0.0, 1.0), (1.0, 0.0), (-1.0, 1.0)])
def test_a_host_path_capacity_without_positive_figures_is_refused(figures: tuple[float, float]) -> None:
    with pytest.raises(ValueError, match="positive"):
        HostPathCapacity(*figures)


def _hbm_decoder_then_many_be(capacity: HostPathCapacity | None) -> tuple[Planner, int, list]:
    """A BE request decoding in HBM (placed before any mode was picked), then seven more BE requests waiting, and
    iterations of a second each until the planner picked its mode twice. Also returns the BE decodes the plans
    ran on the accelerator once host-only moved the first request out."""
    planner, clock, _ = _planner(num_kv_blocks=64)
    planner.host_capacity = capacity
    first = _request("b0", 20, 0.0, max_tokens=60)
    _add(planner, first)
    _prefill(planner, clock, first)
    assert first.placement == "gpu"
    later = [_request(f"b{i}", 20, 0.1 * i) for i in range(1, 8)]
    _add(planner, *later)
    moved, hbm_decodes_once_host_only = [], 0
    while clock.now < 2 * MODE_PERIOD_S + 1:
        plan = planner.schedule()
        moved += plan.be_to_host
        if planner.be_host_only and planner.moves_to_host >= 1:
            hbm_decodes_once_host_only += sum(not c.request.is_ls for c in plan.decodes)
        _ran(planner, clock, plan, seconds=1.0)
    return planner, hbm_decodes_once_host_only, [first, *later, moved]


def test_where_the_host_carries_all_the_be_decode_prefill_feeds_every_be_decode_goes_to_the_host_path() -> None:
    planner, hbm_decodes, (first, *_later, moved) = _hbm_decoder_then_many_be(HostPathCapacity(1e15, 1.0))
    assert planner.be_host_only and planner.be_mode_switches == 1
    assert planner.last_host_decode_tokens_s > planner.last_be_supply_tokens_s > 0
    assert first in moved  # the HBM-resident decode moved to host KV between tokens
    assert hbm_decodes == 0  # from then on no BE decode ran on the accelerator


def test_where_the_host_carries_less_than_prefill_feeds_be_decodes_stay_in_spare_hbm() -> None:
    planner, _, (first, *_later, moved) = _hbm_decoder_then_many_be(HostPathCapacity(1.0, 1.0))
    assert not planner.be_host_only and planner.be_mode_switches == 0
    assert planner.last_be_supply_tokens_s > planner.last_host_decode_tokens_s
    assert first not in moved and first.placement == "gpu"


def test_without_a_host_capacity_hybrid_placement_stays_hbm_first() -> None:
    planner, _, (first, *_) = _hbm_decoder_then_many_be(None)
    assert not planner.be_host_only and planner.last_be_supply_tokens_s == 0
    assert first.placement == "gpu"
