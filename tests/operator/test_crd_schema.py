"""The LLMService CRD: generated from the models, structural, defaulted, and its CEL rules say what is wrong.

The API server is emulated here the way it checks a write: apply the schema's defaults, validate the
OpenAPI schema (Draft 4 semantics, as OpenAPI 3.0), then evaluate every x-kubernetes-validations rule at its
node with `self` (and `oldSelf` on updates, where the old object has that node) using a Python CEL library.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import pytest
import yaml
from crd_validation import with_defaults
from pydantic import ValidationError

from piggyback_operator import api

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "piggyback.dev_llmservices.yaml"
SCHEMA = api.crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]




def cel_messages(schema: dict[str, Any], new: Any, old: Any = None) -> list[str]:
    messages: list[str] = []
    env = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations", []):
        if "oldSelf" in rule["rule"] and old is None:
            continue  # transition rules apply to updates of an existing value only
        activation = {"self": celpy.json_to_cel(new)}
        if old is not None:
            activation["oldSelf"] = celpy.json_to_cel(old)
        if not env.program(env.compile(rule["rule"])).evaluate(activation):
            messages.append(rule["message"])
    if isinstance(new, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in new:
                old_sub = old.get(key) if isinstance(old, dict) else None
                messages += cel_messages(sub, new[key], old_sub)
    return messages


def admit(spec: dict[str, Any], old_spec: dict[str, Any] | None = None, name: str = "chat") -> list[str]:
    """What `kubectl apply` would report: schema errors, then CEL rule messages; [] when accepted."""
    obj = with_defaults(SCHEMA, {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": name},
                                 "spec": spec})
    old = None if old_spec is None else with_defaults(SCHEMA, {**obj, "spec": old_spec})
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in jsonschema.Draft4Validator(SCHEMA).iter_errors(obj)]
    return errors or cel_messages(SCHEMA, obj, old)


def sample(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "manifests" / "samples" / name).read_text())["spec"]


LS = sample("ls-chat.yaml")
BE = sample("be-batch.yaml")


def test_the_committed_crd_is_what_the_models_generate():
    assert CRD_FILE.read_text() == api.crd_yaml(), "regenerate: piggyback-operator crd -o " + str(CRD_FILE)


def test_the_crd_has_status_and_scale_subresources_short_name_and_columns_that_answer_is_it_up():
    version = api.crd_manifest()["spec"]["versions"][0]
    # /scale: kubectl scale, an HPA or KEDA write spec.replicas and read the pool's replicas and pod selector.
    assert version["subresources"] == {"status": {}, "scale": {
        "specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector"}}  # fmt: skip
    for path in ("spec.replicas", "status.replicas", "status.selector"):
        node = SCHEMA
        for part in path.split("."):
            node = node["properties"][part]
        assert node["type"] == ("string" if path.endswith("selector") else "integer"), path
    assert api.crd_manifest()["spec"]["names"]["shortNames"] == ["llms"]
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns == ["Class", "Model", "Ready", "Reason", "TTFT-p99-ms", "TPOT-p99-ms", "Attainment", "BE-tok/s",
                       "Age"]


def test_the_schema_is_structural():
    def walk(node: dict[str, Any], path: str) -> None:
        assert "type" in node or path == "", f"{path} has no type"
        for forbidden in ("$ref", "anyOf", "oneOf", "allOf", "$defs", "title"):
            assert forbidden not in node, f"{path} uses {forbidden}"
        for key, sub in node.get("properties", {}).items():
            walk(sub, f"{path}.{key}")
        if "items" in node:
            walk(node["items"], f"{path}[]")
    walk(SCHEMA, "")
    conditions = SCHEMA["properties"]["status"]["properties"]["conditions"]
    assert (conditions["x-kubernetes-list-type"], conditions["x-kubernetes-list-map-keys"]) == ("map", ["type"])


@pytest.mark.parametrize("spec", [LS, BE], ids=["ls-sample", "be-sample"])
def test_the_samples_are_accepted(spec):
    assert admit(spec) == []
    api.LLMServiceSpec.model_validate(spec)


def test_defaults_fill_in_what_a_minimal_be_spec_leaves_out():
    spec = with_defaults(SCHEMA, {"spec": {"class": "BE", "model": {"uri": "synthetic://tiny-llama"}}})["spec"]
    assert spec["replicas"] == 1
    assert spec["resources"] == {"gpus": 1, "cpuCores": 0, "hostMemory": "0"}
    assert spec["placement"]["pool"] == "default" and spec["model"]["dtype"] == "auto"
    assert spec["expectedLoad"] == {"requestsPerSecond": 0, "concurrency": 0}


@pytest.mark.parametrize(("change", "message"), [
    ({"slo": None}, api.MSG_LS_NEEDS_SLO),
    ({"scaling": {"minReplicas": 3, "maxReplicas": 2}, "replicas": 3}, api.MSG_MIN_LE_MAX),
    ({"replicas": 4}, api.MSG_REPLICAS_IN_RANGE),
    ({"limits": {"defaultMaxTokens": 4096, "maxTokens": 1024}}, api.MSG_DEFAULT_LE_MAX_TOKENS),
], ids=["ls-without-slo", "min-above-max", "replicas-outside-scaling", "default-max-tokens-above-max"])
def test_cel_rules_reject_inconsistent_specs_with_a_message_a_person_can_act_on(change, message):
    spec = {k: v for k, v in {**LS, **change}.items() if v is not None}
    assert admit(spec) == [message]


@pytest.mark.parametrize(("change", "message"), [
    ({"class": "BE", "slo": None}, api.MSG_CLASS_IMMUTABLE),
    ({"model": {**LS["model"], "uri": "pvc://weights/llama"}}, api.MSG_URI_IMMUTABLE),
], ids=["class", "model-uri"])
def test_class_and_model_uri_are_immutable(change, message):
    updated = {k: v for k, v in {**LS, **change}.items() if v is not None}
    assert admit(updated) == []  # valid as a new object...
    assert admit(updated, old_spec=LS) == [message]  # ...but not as a change of an existing one


def test_other_fields_may_change():
    assert admit({**LS, "slo": {**LS["slo"], "ttftMs": 500}, "model": {**LS["model"], "dtype": "float16"}},
                 old_spec=LS) == []


@pytest.mark.parametrize(("change", "field"), [
    ({"slo": {"ttftMs": 0, "tpotMs": 50}}, "spec.slo.ttftMs"),
    ({"slo": {"ttftMs": 300, "tpotMs": 50, "attainmentTarget": 1.5}}, "spec.slo.attainmentTarget"),
    ({"model": {"uri": "https://example.com/llama"}}, "spec.model.uri"),
    ({"class": "Batch"}, "spec.class"),
    ({"resources": {"gpus": 0}}, "spec.resources.gpus"),
    ({"resources": {"hostMemory": "lots"}}, "spec.resources.hostMemory"),
    ({"placement": {"pool": "Not_A_Label"}}, "spec.placement.pool"),
    ({"limits": {"maxTokens": 0}}, "spec.limits.maxTokens"),
    ({"apiKeySecretRef": {"name": "Keys_For_Chat"}}, "spec.apiKeySecretRef.name"),
    ({"apiKeySecretRef": {"key": "api-key"}}, "spec.apiKeySecretRef"),
    ({"drainTimeoutSeconds": 3601}, "spec.drainTimeoutSeconds"),
    ({"drainTimeoutSeconds": -1}, "spec.drainTimeoutSeconds"),
], ids=["ttft-zero", "attainment-above-one", "uri-scheme", "class-enum", "no-gpus", "memory-quantity", "pool-name",
        "max-tokens-zero", "secret-name", "secret-without-name", "drain-too-long", "drain-negative"])
def test_the_schema_bounds_reject_out_of_range_values(change, field):
    errors = admit({**LS, **change})
    assert errors and errors[0].startswith(field + ":"), errors


@pytest.mark.parametrize("limits", [{"defaultMaxTokens": 512, "maxTokens": 512}, {"defaultMaxTokens": 64},
                                    {"maxTokens": 8192}, {}], ids=["equal", "default-only", "max-only", "empty"])
def test_limits_are_accepted_when_the_default_does_not_exceed_the_maximum(limits):
    assert admit({**LS, "limits": limits}) == []
    api.LLMServiceSpec.model_validate({**LS, "limits": limits})


def test_an_api_key_secret_ref_names_a_secret_whose_key_defaults_to_api_key():
    spec = with_defaults(SCHEMA, {"spec": {**LS, "apiKeySecretRef": {"name": "chat-keys"}}})["spec"]
    assert spec["apiKeySecretRef"] == {"name": "chat-keys", "key": "api-key"}
    assert admit({**LS, "apiKeySecretRef": {"name": "chat-keys", "key": "token.txt"}, "drainTimeoutSeconds": 60}) == []
    parsed = api.LLMServiceSpec.model_validate({**LS, "apiKeySecretRef": {"name": "chat-keys"}})
    assert parsed.api_key_secret_ref is not None and parsed.api_key_secret_ref.key == "api-key"


def test_a_service_name_must_be_a_dns_label_because_clients_send_it_as_the_model_name():
    assert admit(LS, name="Chat.v2") == [api.MSG_NAME_DNS_LABEL]


def test_the_operator_side_models_refuse_what_cel_refuses_with_the_same_words():
    with pytest.raises(ValidationError, match=re.escape(api.MSG_LS_NEEDS_SLO)):
        api.LLMServiceSpec.model_validate({k: v for k, v in LS.items() if k != "slo"})
    with pytest.raises(ValidationError, match=re.escape(api.MSG_MIN_LE_MAX)):
        api.LLMServiceSpec.model_validate({**LS, "scaling": {"minReplicas": 3, "maxReplicas": 2}})
    with pytest.raises(ValidationError, match=re.escape(api.MSG_DEFAULT_LE_MAX_TOKENS)):
        api.LLMServiceSpec.model_validate({**LS, "limits": {"defaultMaxTokens": 4096, "maxTokens": 1024}})


def test_every_field_of_the_crd_has_a_description():
    """`kubectl explain llms.spec...` answers for every field: a field without a description fails here."""
    missing: list[str] = []

    def walk(node: dict[str, Any], path: str) -> None:
        for key, sub in node.get("properties", {}).items():
            here = f"{path}.{key}"
            if here not in (".apiVersion", ".kind", ".metadata") and not sub.get("description"):
                missing.append(here)
            walk(sub, here)
        if "items" in node:
            walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}{{}}")
    walk(SCHEMA, "")
    assert not missing, f"fields without a description: {missing}"


@pytest.mark.parametrize(("uri", "message"), [
    ("synthetic://no-such-preset", api.MSG_SYNTHETIC_PRESET),
    ("file://relative/path", api.MSG_FILE_URI_ABSOLUTE),
    ("pvc://claim-without-path", api.MSG_PVC_URI),
], ids=["unknown-preset", "relative-file", "pvc-without-path"])
def test_model_uris_the_runtime_cannot_load_are_refused_by_the_crd_and_the_model(uri, message):
    spec = {**LS, "model": {"uri": uri}}
    assert admit(spec) == [message]
    with pytest.raises(ValidationError, match=re.escape(message)):
        api.LLMServiceSpec.model_validate(spec)


def test_the_synthetic_presets_are_the_runtimes_own_list():
    from piggyback_runtime.model import arch  # the runtime's one list (imports torch: fine in a test)

    assert tuple(sorted(arch.SYNTHETIC_PRESETS)) == api.SYNTHETIC_PRESETS
    for preset in api.SYNTHETIC_PRESETS:
        assert admit({**LS, "model": {"uri": f"synthetic://{preset}"}}) == []
    assert admit({**LS, "model": {"uri": "file:///models/llama"}}) == []
    assert admit({**LS, "model": {"uri": "pvc://weights/llama/8b"}}) == []


POD = {
    "image": "registry.example.com/piggyback-runtime:1.2", "imagePullSecrets": [{"name": "regcred"}],
    "priorityClassName": "llm-serving",
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}],
    "nodeSelector": {"pool": "gpu"},
    "env": [{"name": "HF_HUB_OFFLINE", "value": "1"},
            {"name": "TEAM", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}}],
    "volumes": [{"name": "certs", "secret": {"secretName": "ca-bundle"}}],
    "volumeMounts": [{"name": "certs", "mountPath": "/etc/ssl/extra", "readOnly": True}],
    "annotations": {"sidecar.istio.io/inject": "false"}, "labels": {"team": "search"},
    "resources": {"requests": {"cpu": "6"}, "limits": {"memory": "96Gi"}},
}  # fmt: skip


def test_pod_settings_a_cluster_needs_are_accepted():
    assert admit({**LS, "pod": POD}) == []
    parsed = api.LLMServiceSpec.model_validate({**LS, "pod": POD})
    assert parsed.pod.volumes[0].model_dump(by_alias=True) == POD["volumes"][0]  # the volume source passes through


@pytest.mark.parametrize(("pod", "message"), [
    ({"env": [{"name": "PIGGYBACK_API_KEY_CHAT", "value": "x"}]}, api.MSG_ENV_RESERVED),
    ({"env": [{"name": "HOME", "value": "/root"}]}, api.MSG_ENV_RESERVED),
    ({"volumes": [{"name": "cache", "emptyDir": {}}]}, api.MSG_VOLUME_RESERVED),
    ({"volumes": [{"name": "x", "emptyDir": {}}], "volumeMounts": [{"name": "x", "mountPath": "/tmp"}]},
     api.MSG_MOUNT_PATH_RESERVED),
    ({"volumeMounts": [{"name": "nowhere", "mountPath": "/data"}]}, api.MSG_MOUNT_NEEDS_VOLUME),
    ({"labels": {"piggyback.dev/pool": "other"}}, api.MSG_LABEL_RESERVED),
    ({"annotations": {"piggyback.dev/config-hash": "0"}}, api.MSG_ANNOTATION_RESERVED),
    ({"resources": {"limits": {"nvidia.com/gpu": "2"}}}, api.MSG_GPU_OVERRIDE),
], ids=["env-prefix", "env-home", "volume-name", "mount-path", "mount-without-volume", "label", "annotation",
        "gpu-override"])
def test_pod_settings_that_clash_with_what_the_operator_sets_are_refused(pod, message):
    assert admit({**LS, "pod": pod}) == [message]
    with pytest.raises(ValidationError, match=re.escape(message)):
        api.LLMServiceSpec.model_validate({**LS, "pod": pod})


def test_a_node_selector_key_set_twice_must_agree():
    spec = {**LS, "placement": {"nodeSelector": {"gpu": "h100"}}, "pod": {"nodeSelector": {"gpu": "a100"}}}
    assert admit(spec) == [api.MSG_NODE_SELECTOR_CONFLICT]
    with pytest.raises(ValidationError, match=re.escape(api.MSG_NODE_SELECTOR_CONFLICT)):
        api.LLMServiceSpec.model_validate(spec)
    agreeing = {**spec, "pod": {"nodeSelector": {"gpu": "h100", "zone": "a"}}}
    assert admit(agreeing) == []
    assert api.LLMServiceSpec.model_validate(agreeing).node_selector == {"gpu": "h100", "zone": "a"}


def test_keda_autoscaling_needs_room_to_scale():
    spec = {**LS, "scaling": {"minReplicas": 2, "maxReplicas": 2, "autoscaler": "keda"}, "replicas": 2}
    assert admit(spec) == [api.MSG_KEDA_NEEDS_RANGE]
    with pytest.raises(ValidationError, match=re.escape(api.MSG_KEDA_NEEDS_RANGE)):
        api.LLMServiceSpec.model_validate(spec)
