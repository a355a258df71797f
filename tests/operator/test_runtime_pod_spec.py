"""What the operator renders for a pool, read as the kubelet, the runtime and the network would read it:
limits and API keys reach the runtime's config, the grace period outlasts the drain, the pod runs hardened
with every path the runtime writes on a writable volume, and the NetworkPolicy lets in only whom it should.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from piggyback_operator import api, pools
from piggyback_operator.api import LLMServiceSpec
from piggyback_runtime.attention import cpu_attention
from piggyback_runtime.config import RuntimeConfig
from piggyback_runtime.scheduler import latency_model

RUNTIME_EXIT_BOUND_S = 5  # the runtime exits within drain_timeout_s + 5 s (ServerConfig)


def member(name: str, cls: str = "LS", namespace: str = "team-a", **spec: Any) -> pools.Member:
    body: dict[str, Any] = {"class": cls, "model": {"uri": "synthetic://tiny-llama"}, **spec}
    if cls == "LS":
        body.setdefault("slo", {"ttftMs": 200, "tpotMs": 40})
    return pools.Member(name, namespace, f"uid-{name}", LLMServiceSpec.model_validate(body), True, False, name)


def render(*members: pools.Member) -> tuple[RuntimeConfig, dict[str, Any]]:
    configmap, deployment = pools.render_children("pool", members[0].namespace, members, replicas=1, scaled=0)
    return RuntimeConfig.from_dict(yaml.safe_load(configmap["data"][pools.CONFIG_KEY])), deployment


def container(deployment: Mapping[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


# --- limits, API keys, drain ---------------------------------------------------------------------------------


def test_limits_become_the_services_default_and_maximum_max_tokens():
    config, _ = render(member("chat", limits={"defaultMaxTokens": 256, "maxTokens": 2048}), member("batch", "BE"))
    chat, batch = config.service("chat"), config.service("batch")
    assert (chat.default_max_tokens, chat.max_tokens_limit) == (256, 2048)
    assert (batch.default_max_tokens, batch.max_tokens_limit) == (None, None)  # the runtime's own defaults


def test_an_api_key_secret_becomes_an_env_var_from_the_secret_named_in_the_services_config():
    config, deployment = render(member("chat-v2", apiKeySecretRef={"name": "chat-keys"}),
                                member("open", "BE", apiKeySecretRef=None))
    env = {e["name"]: e for e in container(deployment)["env"]}
    assert config.service("chat-v2").api_key_env == "PIGGYBACK_API_KEY_CHAT_V2"
    assert env["PIGGYBACK_API_KEY_CHAT_V2"]["valueFrom"] == {
        "secretKeyRef": {"name": "chat-keys", "key": "api-key", "optional": False}}  # fmt: skip
    assert config.service("open").api_key_env is None
    assert not [name for name in env if name.startswith("PIGGYBACK_API_KEY_") and name != "PIGGYBACK_API_KEY_CHAT_V2"]
    assert all("value" not in e for e in env.values() if e["name"].startswith("PIGGYBACK_API_KEY_")), \
        "the key itself must never be in the Deployment"


@pytest.mark.parametrize(("drains", "expected_drain"), [((None, None), 20), ((5, None), 5), ((90, 30), 90)],
                         ids=["runtime-default", "one-member-asks", "longest-wins"])
def test_the_pool_drains_for_its_longest_member_and_the_grace_period_outlasts_the_drain(drains, expected_drain):
    members = [member("chat", drainTimeoutSeconds=drains[0]), member("batch", "BE", drainTimeoutSeconds=drains[1])]
    config, deployment = render(*members)
    assert config.server.drain_timeout_s == expected_drain
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # SIGKILL must not come before the runtime has drained and exited, with a margin for a loaded node.
    assert grace >= expected_drain + RUNTIME_EXIT_BOUND_S + 5
    assert grace == expected_drain + pools.GRACE_MARGIN_S
    assert "lifecycle" not in container(deployment), "no preStop: the runtime answers 503 itself (README)"


# --- hardening -------------------------------------------------------------------------------------------------


def test_the_runtime_pod_runs_non_root_read_only_without_capabilities_under_runtime_default_seccomp():
    _, deployment = render(member("chat"))
    pod = deployment["spec"]["template"]["spec"]
    ctx = container(deployment)["securityContext"]
    for scope in (pod["securityContext"], ctx):
        assert scope["runAsNonRoot"] is True and scope["runAsUser"] != 0
        assert scope["seccompProfile"] == {"type": "RuntimeDefault"}
    assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]} and ctx["privileged"] is False
    assert pod["automountServiceAccountToken"] is False


def test_every_path_the_runtime_writes_is_on_a_writable_volume(monkeypatch):
    _, deployment = render(member("chat"))
    c = container(deployment)
    writable = [Path(m["mountPath"]) for m in c["volumeMounts"] if not m.get("readOnly")]
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    assert all("emptyDir" in volumes[m["name"]] for m in c["volumeMounts"] if not m.get("readOnly"))
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    for name in ("HOME", "XDG_CACHE_HOME", "PIGGYBACK_PROFILE_DIR", "TMPDIR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # The paths as the runtime itself computes them from that environment, plus where Python and g++ put
    # temporary files, and where torch shares tensors between processes.
    written = {
        "CPU-attention kernel build": cpu_attention._cache_root(),
        "latency profile cache": latency_model.default_profile_dir(),
        "home (~/.cache of libraries)": Path(os.path.expanduser("~")) / ".cache",
        "temporary files": Path("/tmp"),
        "shared memory": Path("/dev/shm"),
    }
    for what, path in written.items():
        assert any(path == w or w in path.parents for w in writable), f"{what} ({path}) is not on a writable volume"


# --- NetworkPolicy ---------------------------------------------------------------------------------------------

NAMESPACES = {  # name -> labels, as the API server labels them (kubernetes.io/metadata.name always)
    "team-a": {}, "team-b": {"piggyback.dev/llm-clients": "true"}, "team-c": {}, "monitoring": {},
    "piggyback-system": {},
}


def allows(policy: Mapping[str, Any], namespace: str, pod_labels: Mapping[str, str], port: int) -> bool:
    """Would `policy` admit TCP to `port` from a pod in `namespace` (NetworkPolicy semantics, matchLabels)?"""
    ns_labels = {"kubernetes.io/metadata.name": namespace, **NAMESPACES[namespace]}

    def matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
        return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())

    policy_ns = policy["metadata"]["namespace"]
    for rule in policy["spec"]["ingress"]:
        if not any(p["port"] == port and p["protocol"] == "TCP" for p in rule["ports"]):
            continue
        for peer in rule["from"]:
            ns_ok = matches(peer["namespaceSelector"], ns_labels) if "namespaceSelector" in peer else (
                namespace == policy_ns)  # a podSelector alone means the policy's own namespace
            pod_ok = matches(peer["podSelector"], pod_labels) if "podSelector" in peer else True
            if ns_ok and pod_ok:
                return True
    return False


ROUTER = {"app.kubernetes.io/component": "router"}
OPERATOR = {"app.kubernetes.io/name": "piggyback-operator"}
PROMETHEUS = {"app.kubernetes.io/name": "prometheus"}


@pytest.mark.parametrize(("namespace", "labels", "allowed"), [
    ("team-a", {}, True),  # the LLMServices' own namespace: their clients
    ("team-b", {}, True),  # a namespace labelled as a client namespace
    ("team-c", {}, False),  # any other namespace
    ("team-c", ROUTER, False),  # a pod calling itself a router elsewhere
    ("piggyback-system", ROUTER, True),  # the router next to the operator
    ("piggyback-system", OPERATOR, True),  # the operator scrapes /metrics
    ("piggyback-system", {}, False),
    ("monitoring", PROMETHEUS, True),
    ("monitoring", {"app.kubernetes.io/name": "grafana"}, False),
    ("team-c", PROMETHEUS, False),
], ids=["own-namespace", "client-namespace", "other-namespace", "router-elsewhere", "router", "operator",
        "operator-namespace-other-pod", "prometheus", "monitoring-other-pod", "prometheus-elsewhere"])
def test_the_network_policy_admits_only_clients_the_router_the_operator_and_prometheus(namespace, labels, allowed):
    members = [member("chat")]
    policy = pools.render_network_policy("pool", "team-a", members, pools.NetworkPolicySettings())
    assert policy["spec"]["podSelector"] == {"matchLabels": {pools.LABEL_POOL: "pool"}}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    assert allows(policy, namespace, labels, pools.RUNTIME_PORT) is allowed
    assert not allows(policy, "team-a", {}, 22), "only the runtime port"


def test_who_counts_as_client_router_and_prometheus_is_configured_by_labels_in_the_operators_environment():
    settings = pools.NetworkPolicySettings.from_env({
        "PIGGYBACK_CLIENT_NAMESPACE_SELECTOR": "tier=frontend",
        "PIGGYBACK_PROMETHEUS_NAMESPACE_SELECTOR": "",  # any namespace, by pod label alone
        "PIGGYBACK_PROMETHEUS_POD_SELECTOR": "app=prom,team=sre",
        "PIGGYBACK_OPERATOR_NAMESPACE": "ops",
    })  # fmt: skip
    assert settings.client_namespaces == {"tier": "frontend"} and settings.operator_namespace == "ops"
    policy = pools.render_network_policy("pool", "team-a", [member("chat")], settings)
    peers = policy["spec"]["ingress"][0]["from"]
    assert {"namespaceSelector": {"matchLabels": {"tier": "frontend"}}} in peers
    assert {"namespaceSelector": {"matchLabels": {}}, "podSelector": {"matchLabels": {"app": "prom", "team": "sre"}}} \
        in peers
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}},
            "podSelector": {"matchLabels": OPERATOR}} in peers  # fmt: skip
    assert not pools.NetworkPolicySettings.from_env({"PIGGYBACK_NETWORK_POLICY": "false"}).enabled
    with pytest.raises(ValueError, match="not key=value"):
        pools.NetworkPolicySettings.from_env({"PIGGYBACK_CLIENT_NAMESPACE_SELECTOR": "frontend"})


def test_the_network_policy_is_owned_by_every_member_like_the_other_pool_children():
    members = [member("chat"), member("batch", "BE")]
    policy = pools.render_network_policy("pool", "team-a", members, pools.NetworkPolicySettings())
    assert {r["name"] for r in policy["metadata"]["ownerReferences"]} == {"chat", "batch"}
    assert not any(r["controller"] for r in policy["metadata"]["ownerReferences"])


# --- spec.pod: the settings clusters require ------------------------------------------------------------------


POD_SETTINGS: dict[str, Any] = {
    "image": "registry.example.com/piggyback-runtime:1.2", "imagePullSecrets": [{"name": "regcred"}],
    "priorityClassName": "llm-serving",
    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm", "effect": "NoSchedule"}],
    "nodeSelector": {"pool": "gpu"},
    "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
    "volumes": [{"name": "certs", "secret": {"secretName": "ca-bundle"}}],
    "volumeMounts": [{"name": "certs", "mountPath": "/etc/ssl/extra", "readOnly": True}],
    "annotations": {"sidecar.istio.io/inject": "false"}, "labels": {"team": "search"},
    "resources": {"requests": {"cpu": "6"}, "limits": {"memory": "96Gi"}},
}  # fmt: skip


def test_pod_settings_reach_the_runtime_pods_next_to_what_the_operator_sets():
    _, deployment = render(member("chat", pod=POD_SETTINGS))
    template = deployment["spec"]["template"]
    pod, runtime = template["spec"], container(deployment)
    assert runtime["image"] == POD_SETTINGS["image"] and pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["priorityClassName"] == "llm-serving" and pod["affinity"] == POD_SETTINGS["affinity"]
    assert pod["nodeSelector"] == {"pool": "gpu"} and POD_SETTINGS["tolerations"][0] in pod["tolerations"]
    env = [e["name"] for e in runtime["env"]]
    assert "HF_HUB_OFFLINE" in env and "HOME" in env  # added to the operator's, not instead of them
    assert {"name": "certs", "secret": {"secretName": "ca-bundle"}} in pod["volumes"]
    assert {v["name"] for v in pod["volumes"]} >= {"config", "tmp", "cache", "dshm"}
    assert POD_SETTINGS["volumeMounts"][0] in runtime["volumeMounts"]
    assert template["metadata"]["labels"]["team"] == "search"
    assert template["metadata"]["labels"][pools.LABEL_POOL] == "pool"
    assert template["metadata"]["annotations"]["sidecar.istio.io/inject"] == "false"
    assert pools.ANNOTATION_CONFIG_HASH in template["metadata"]["annotations"]
    resources = runtime["resources"]
    assert resources["requests"]["cpu"] == "6" and resources["limits"]["memory"] == "96Gi"
    assert resources["requests"]["memory"] == "4Gi"  # not overridden: still derived
    assert resources["limits"][pools.GPU_RESOURCE] == "1"


def test_without_pod_settings_the_image_is_the_operators_and_nothing_extra_is_set():
    _, deployment = render(member("chat"))
    pod = deployment["spec"]["template"]["spec"]
    assert container(deployment)["image"] == pools.runtime_image()
    assert not {"priorityClassName", "affinity", "imagePullSecrets"} & set(pod)


def test_the_first_member_wins_a_name_two_members_of_one_pod_set():
    first = member("a-chat", pod={"env": [{"name": "MODE", "value": "a"}], "image": "img:a", "labels": {"t": "a"}})
    second = member("b-batch", "BE", pod={"env": [{"name": "MODE", "value": "b"}, {"name": "EXTRA", "value": "1"}],
                                         "image": "img:b", "labels": {"t": "b", "u": "b"}})
    _, deployment = render(first, second)
    env = {e["name"]: e.get("value") for e in container(deployment)["env"]}
    assert env["MODE"] == "a" and env["EXTRA"] == "1"
    assert container(deployment)["image"] == "img:a"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert (labels["t"], labels["u"]) == ("a", "b")


def test_what_the_operator_sets_on_the_pod_is_what_the_crd_reserves():
    """The CEL rules refuse spec.pod values that would clash; they must cover every name the operator uses."""
    _, deployment = render(member("chat-v2", apiKeySecretRef={"name": "keys"}, model={"uri": "pvc://weights/m"}))
    pod, runtime = deployment["spec"]["template"]["spec"], container(deployment)
    for env in runtime["env"]:
        assert env["name"].startswith(api.RESERVED_ENV_PREFIX) or env["name"] in api.RESERVED_ENV_NAMES, env
    assert {v["name"] for v in pod["volumes"]} <= set(api.RESERVED_VOLUME_NAMES)
    for mount in runtime["volumeMounts"]:
        assert any(mount["mountPath"] == p or mount["mountPath"].startswith(p + "/")
                   for p in api.RESERVED_MOUNT_PATHS), mount  # fmt: skip
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert all(k.startswith(api.RESERVED_LABEL_PREFIXES) for k in labels)
    assert all(k.startswith(api.RESERVED_ANNOTATION_PREFIXES)
               for k in deployment["spec"]["template"]["metadata"]["annotations"])  # fmt: skip
