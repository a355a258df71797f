"""spec.batch of a BE LLMService: the runtime config's batch section, the claim or the Postgres Secret, and the
runtime container's volume, mount and environment."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from piggyback_operator import api, pools
from piggyback_operator.api import LLMServiceSpec
from piggyback_runtime.config import RuntimeConfig


def member(name: str, service_class: str = "BE", **spec: Any) -> pools.Member:
    body: dict[str, Any] = {"model": {"uri": "synthetic://tiny-llama"}, "class": service_class, **spec}
    if service_class == "LS":
        body["slo"] = {"ttftMs": 500, "tpotMs": 50}
    return pools.Member(name, "serving", f"uid-{name}", LLMServiceSpec.model_validate(body), True, False,
                        "2026-01-01T00:00:00Z")


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def test_a_pvc_gives_sqlite_on_a_claim_the_operator_creates() -> None:
    members = [member("chat", "LS"), member("bulk", batch={"storage": {"pvc": {"size": "5Gi",
                                                                              "storageClassName": "fast"}}})]
    configmap, deployment = pools.render_children("pool-a", "serving", members, replicas=1, scaled=1)
    config = RuntimeConfig.from_dict(yaml.safe_load(configmap["data"][pools.CONFIG_KEY]))
    assert config.batch.enabled and config.batch.directory == pools.BATCH_DIR and config.batch.database_url is None
    claim = pools.render_batch_claim("pool-a", "serving", members)
    assert claim is not None and claim["metadata"]["name"] == "pool-a-batch"
    assert claim["spec"]["resources"]["requests"]["storage"] == "5Gi" and claim["spec"]["storageClassName"] == "fast"
    assert "ownerReferences" not in claim["metadata"]  # batches outlive the Deployment
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert {"name": "batch", "persistentVolumeClaim": {"claimName": "pool-a-batch"}} in volumes
    assert {"name": "batch", "mountPath": pools.BATCH_DIR} in container(deployment)["volumeMounts"]


def test_a_postgres_secret_reaches_the_pod_as_env_and_no_claim_is_made() -> None:
    members = [member("bulk", batch={"storage": {"postgresSecretRef": {"name": "batch-db"}}})]
    _, deployment = pools.render_children("pool-b", "serving", members, replicas=3, scaled=3)
    config = pools.render_runtime_config(members)
    assert config.batch.enabled and config.batch.database_url_env == pools.BATCH_DATABASE_URL_ENV
    assert pools.render_batch_claim("pool-b", "serving", members) is None
    env = {e["name"]: e for e in container(deployment)["env"]}
    assert env[pools.BATCH_DATABASE_URL_ENV]["valueFrom"]["secretKeyRef"] == {
        "name": "batch-db", "key": "database-url", "optional": False}
    assert all(v.get("name") != "batch" for v in deployment["spec"]["template"]["spec"]["volumes"])


def test_without_spec_batch_nothing_changes() -> None:
    members = [member("bulk")]
    assert not pools.render_runtime_config(members).batch.enabled
    assert pools.render_batch_claim("p", "serving", members) is None


@pytest.mark.parametrize(("service_class", "batch", "message"), [
    ("LS", {"enabled": True}, api.MSG_BATCH_BE_ONLY),
    ("BE", {"storage": {}}, api.MSG_BATCH_ONE_STORAGE),
    ("BE", {"storage": {"pvc": {}, "postgresSecretRef": {"name": "db"}}}, api.MSG_BATCH_ONE_STORAGE),
])  # fmt: skip
def test_bad_batch_specs_are_refused_with_the_rule(service_class: str, batch: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message.split(":")[0]):
        member("svc", service_class, batch=batch)
