"""A field the schema does not know does nothing, so it must not pass silently.

A real API server prunes unknown fields from a structural schema's objects; with server-side field validation
Strict (kubectl's default, `--validate=strict`; GA in Kubernetes 1.27) it refuses the request instead, naming
the field. Clients that send Warn or Ignore (the API's default is Warn: the field is dropped with a warning
header) get an object without the typo. The operator sees the manifest as written in kubectl's
last-applied-configuration annotation (and in the object itself where nothing pruned it) and posts a Warning
Event naming each unknown field, which `kubectl describe llms` shows.
"""

from __future__ import annotations

import json

import pytest
from conftest import LLMS_PATH, NAMESPACE, eventually, ls_spec

from piggyback_operator import api

pytestmark = pytest.mark.timeout(90)


def test_unknown_fields_are_found_at_any_depth_but_not_inside_pass_through_objects():
    spec = {**ls_spec(), "placement": {"routng": "leastLoaded"}, "slo": {"ttftMs": 1, "tpotMs": 1, "tftMs": 2},
            "replica": 2, "pod": {"affinity": {"anythingGoes": {}}, "volumes": [{"name": "v", "nfs": {"x": 1}}],
                                  "env": [{"name": "A", "valu": "1"}]}}  # fmt: skip
    assert sorted(api.unknown_fields(spec)) == ["spec.placement.routng", "spec.pod.env[0].valu", "spec.replica",
                                                "spec.slo.tftMs"]  # fmt: skip
    assert api.unknown_fields(ls_spec()) == []


def test_the_last_applied_manifest_counts_and_a_broken_annotation_is_ignored():
    applied = {"apiVersion": api.API_VERSION, "kind": api.KIND, "spec": {**ls_spec(), "scailng": {}}}
    body = {"metadata": {"annotations": {api.LAST_APPLIED_ANNOTATION: json.dumps(applied)}}, "spec": ls_spec()}
    assert api.unknown_spec_fields(body) == ["spec.scailng"]
    body["metadata"]["annotations"][api.LAST_APPLIED_ANNOTATION] = "{not json"
    assert api.unknown_spec_fields(body) == []


@pytest.mark.slow  # starts a process (a Python subprocess or the operator)
async def test_the_operator_posts_a_warning_event_naming_a_field_the_api_server_pruned(cluster, operator):
    await cluster.add_gpu_node("gpu-a")
    applied = {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "chat", "namespace": NAMESPACE},
               "spec": {**ls_spec(), "placement": {"routng": "leastLoaded"}}}  # fmt: skip
    # What the API server stores after pruning: the spec without the typo, kubectl's annotation with it.
    await cluster._request("POST", LLMS_PATH, {
        "apiVersion": api.API_VERSION, "kind": api.KIND,
        "metadata": {"name": "chat", "namespace": NAMESPACE,
                     "annotations": {api.LAST_APPLIED_ANNOTATION: json.dumps(applied)}},
        "spec": ls_spec(),
    })  # fmt: skip
    events = await eventually(lambda: cluster.events("UnknownField"), what="an UnknownField event")
    assert events[0]["type"] == "Warning"
    assert "spec.placement.routng" in events[0]["message"] and "no effect" in events[0]["message"]
    # The rest of the spec is fine: the service is served as if the typo were not there.
    await eventually(lambda: cluster.condition("chat", "Admitted").get("status") == "True", what="admitted")


@pytest.mark.slow  # starts a process (a Python subprocess or the operator)
async def test_a_typo_that_reaches_the_operator_is_named_in_the_event_and_the_invalid_spec_condition(cluster,
                                                                                                      operator):
    await cluster.create("chat", {**ls_spec(), "replcas": 2})  # the emulated API server does not prune
    events = await eventually(lambda: cluster.events("UnknownField"), what="an UnknownField event")
    assert "spec.replcas" in events[0]["message"]
    ready = await eventually(lambda: cluster.condition("chat", "Ready").get("reason") == "InvalidSpec"
                             and cluster.condition("chat", "Ready"), what="InvalidSpec")  # fmt: skip
    assert "replcas" in ready["message"]
