"""Deleting an LLMService whose scrape timer is mid-run finalizes promptly (kopf's default waits 60 s)."""

import asyncio
import time

import pytest
from conftest import be_spec, eventually, ls_spec

import piggyback_operator.handlers as h

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]  # slow: the operator against an emulated API server


async def test_deleting_a_service_whose_timer_is_running_finalizes_promptly(cluster, operator, monkeypatch):
    real = h.write_status

    async def slow(memo, member, *args, **kwargs):  # widen the window in which batch's timer is in flight
        result = await real(memo, member, *args, **kwargs)
        if member.name == "batch":
            await asyncio.sleep(2)
        return result

    monkeypatch.setattr(h, "write_status", slow)
    await cluster.add_gpu_node("gpu-a")
    await cluster.create("chat", ls_spec())
    await cluster.create("batch", be_spec())
    await eventually(lambda: cluster.condition("batch", "Admitted").get("status") == "True")
    await asyncio.sleep(3)  # batch's 1 s timer is now running (and sleeping inside write_status)
    started = time.monotonic()
    await cluster.delete("batch")
    await eventually(lambda: cluster.llms("batch") is None, timeout=90, what="batch finalized")
    assert time.monotonic() - started < 10
