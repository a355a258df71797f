"""Pure parts of the operator: quantiles over scraped buckets, placement, rendering, quantities."""

from __future__ import annotations

import math

import pytest

from piggyback_operator import pools
from piggyback_operator.api import LLMServiceSpec, Toleration
from piggyback_operator.placement import NodeInfo, PodUsage, matches, room
from piggyback_operator.quantity import format_bytes, parse_quantity
from piggyback_operator.scrape import aggregate, parse_exposition, quantile
from piggyback_runtime import metrics as m


def exposition(ttft: list[float], tokens: float, headroom: float | None = None) -> str:
    metrics = m.RuntimeMetrics()
    for v in ttft:
        metrics.ttft.labels("chat", "LS").observe(v)
    metrics.generation_tokens.labels("batch", "BE").inc(tokens)
    text = metrics.render().decode()
    if headroom is not None:
        text += f"# TYPE {m.LS_HEADROOM_RPS} gauge\n{m.LS_HEADROOM_RPS} {headroom}\n"
    return text


def test_quantile_interpolates_within_the_bucket_like_promql():
    assert quantile(0.5, {0.1: 0, 0.2: 10, math.inf: 10}) == pytest.approx(0.15)
    assert quantile(0.99, {0.1: 100, math.inf: 100}) == pytest.approx(0.099)
    assert quantile(0.99, {0.1: 0, math.inf: 5}) == 0.1  # beyond the last finite bound: that bound
    assert quantile(0.99, {0.1: 0, math.inf: 0}) is None


def test_replicas_are_aggregated_by_adding_buckets_and_rates_come_from_counter_deltas():
    before = {"a": parse_exposition(exposition([0.01] * 10, tokens=100), at=0.0),
              "b": parse_exposition(exposition([], tokens=0), at=0.0)}
    now = {"a": parse_exposition(exposition([0.01] * 10 + [0.3] * 10, tokens=300), at=10.0),
           "b": parse_exposition(exposition([0.3] * 80, tokens=500, headroom=2.0), at=10.0)}
    figures = aggregate(now, before, at=10.0)
    chat, batch = figures.service("chat"), figures.service("batch")
    assert 0.2 < chat.ttft_p99_s <= 0.3  # only the 90 new requests count, all of them slow
    assert batch.tokens_per_second == pytest.approx((200 + 500) / 10)
    assert figures.headroom_rps == 2.0 and figures.pods == 2


def test_a_runtime_without_the_headroom_metric_reports_headroom_unknown():
    figures = aggregate({"a": parse_exposition(exposition([0.01], tokens=1), at=1.0)}, {}, at=1.0)
    assert figures.headroom_rps is None


def test_nodes_match_on_gpus_labels_and_tolerated_taints():
    node = NodeInfo("n", {"accelerator": "h100"}, ({"key": "gpu", "value": "true", "effect": "NoSchedule"},),
                    gpus=2, memory_bytes=2**40, cpu_cores=64)
    gpu_toleration = Toleration(key="gpu", operator="Exists", effect="NoSchedule")
    assert matches(node, {"accelerator": "h100"}, [gpu_toleration], gpus=2)
    assert not matches(node, {"accelerator": "h100"}, [], gpus=1)  # taint not tolerated
    assert not matches(node, {"accelerator": "l4"}, [gpu_toleration], gpus=1)
    assert not matches(node, {}, [gpu_toleration], gpus=4)


def test_room_subtracts_what_scheduled_pods_request():
    node = NodeInfo("n", {}, (), gpus=4, memory_bytes=100 * 2**30, cpu_cores=64)
    rooms = room([node], [PodUsage("n", 1, 30 * 2**30, 4), PodUsage("other", 1, 0, 0)])
    assert (rooms["n"].gpus, rooms["n"].memory_bytes) == (3, 70 * 2**30)


def test_quantities():
    assert parse_quantity("64Gi") == 64 * 2**30 and parse_quantity("500m") == 0.5 and parse_quantity("1e3") == 1000
    assert format_bytes(68 * 2**30) == "68Gi"
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        parse_quantity("lots")


def member(name: str, cls: str, **spec: object) -> pools.Member:
    body = {"class": cls, "model": {"uri": "pvc://weights/llama-8b"}, **spec}
    if cls == "LS":
        body.setdefault("slo", {"ttftMs": 200, "tpotMs": 40})
    return pools.Member(name, "ns", f"uid-{name}", LLMServiceSpec.model_validate(body), True, False, name)


def test_a_pvc_model_is_mounted_where_the_runtime_looks_for_it():
    configmap, deployment = pools.render_children("p", "ns", [member("chat", "LS")], replicas=1, scaled=0)
    pod = deployment["spec"]["template"]["spec"]
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "weights", "readOnly": True}} in pod["volumes"]
    assert {"name": "model", "mountPath": "/models/weights", "readOnly": True} in pod["containers"][0]["volumeMounts"]
    assert "uri: pvc://weights/llama-8b" in configmap["data"]["runtime.yaml"]


def test_services_of_one_model_and_pool_share_a_pool_name_and_other_models_do_not():
    assert member("a", "LS").pool == member("b", "BE").pool
    assert member("a", "LS").pool != member("c", "LS", model={"uri": "synthetic://small-llama"}).pool
    assert member("a", "LS").pool != member("d", "LS", placement={"pool": "blue"}).pool


def test_pool_replicas_keep_every_members_floor_and_scale_only_within_the_largest_max():
    members = [member("a", "LS", replicas=2, scaling={"minReplicas": 1, "maxReplicas": 3}), member("b", "BE")]
    assert pools.desired_replicas(members, scaled=0) == 2
    assert pools.desired_replicas(members, scaled=3) == 3
    assert pools.desired_replicas(members, scaled=9) == 3


def test_be_host_memory_and_cpu_cores_size_the_runtimes_host_kv_and_cpu_attention_threads():
    members = [member("chat", "LS"), member("jobs", "BE", resources={"hostMemory": "8Gi", "cpuCores": 6})]
    config = pools.render_runtime_config(members)
    assert config.piggyback.host_kv_memory_gib == 8
    assert config.piggyback.cpu_threads_per_worker == 6
    # Without BE resources the runtime keeps its own defaults.
    assert pools.render_runtime_config([member("chat", "LS")]).piggyback == type(config.piggyback)()


def test_a_condition_keeps_its_transition_time_until_its_status_flips() -> None:
    from piggyback_operator.conditions import FALSE, TRUE, Cond, render

    old = [{"type": "Admitted", "status": TRUE, "lastTransitionTime": "2020-01-01T00:00:00Z"}]
    same = render(old, [Cond("Admitted", TRUE, "Fits", "still fits")], generation=3)
    flipped = render(old, [Cond("Admitted", FALSE, "NoRoom", "no room")], generation=None)
    new = render(None, [Cond("Placed", TRUE, "Placed", "on gpu-a")], generation=None)
    assert same == [{"type": "Admitted", "status": TRUE, "reason": "Fits", "message": "still fits",
                     "lastTransitionTime": "2020-01-01T00:00:00Z", "observedGeneration": 3}]  # fmt: skip
    assert flipped[0]["lastTransitionTime"] > "2020" and "observedGeneration" not in flipped[0]
    assert new[0]["lastTransitionTime"] > "2020"
