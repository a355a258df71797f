"""RuntimeConfig validation and model-loading errors: each names what is wrong and what to change."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from piggyback_runtime.config import ConfigError, RuntimeConfig
from piggyback_runtime.model.arch import SYNTHETIC_PRESETS, ModelArch, ModelLoadError
from piggyback_runtime.model.loader import load_model, resolve_dtype
from tests.runtime.helpers import tiny_config

VALID = {
    "model": {"uri": "synthetic://tiny-llama"},
    "services": [
        {"name": "chat", "class": "LS", "slo": {"ttft_ms": 500, "tpot_ms": 50}},
        {"name": "jobs", "class": "BE"},
    ],
}


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        RuntimeConfig.from_dict(data)
    return str(info.value)


def test_a_valid_config_round_trips_through_yaml(tmp_path: Path) -> None:
    config = RuntimeConfig.from_dict(VALID)
    assert config.services[0].slo is not None and config.services[0].slo.ttft_s == 0.5
    path = tmp_path / "runtime.yaml"
    path.write_text(config.to_yaml())
    assert "class: LS" in path.read_text()
    assert RuntimeConfig.from_yaml(path) == config


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"engine": {"block_sise": 16}}, "engine.block_sise: unknown field"),
        ({"engine": {"max_num_seqs": 0}}, "engine.max_num_seqs: Input should be greater than or equal to 1"),
        ({"model": {"uri": "s3://bucket/model"}}, "model.uri: Value error, 's3://bucket/model' has no supported"),
        ({"device": "tpu"}, "device: Value error, 'tpu' is not a device"),
        ({"services": [{"name": "chat", "class": "LS"}]}, "needs an `slo`"),
        ({"services": [{"name": "Chat_1", "class": "BE"}]}, "not a DNS-1123 label"),
        ({"services": [{"name": "a", "class": "BE"}, {"name": "a", "class": "BE"}]}, "repeated: a"),
        ({"services": [{"name": "a", "class": "XX"}]}, "services.0.class: Input should be 'LS' or 'BE'"),
        ({"services": []}, "services: List should have at least 1 item"),
    ],
)
def test_bad_values_are_rejected_naming_the_field(patch: dict, expected: str) -> None:
    assert expected in _error({**VALID, **patch})


def test_missing_or_broken_yaml_files_say_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such config file"):
        RuntimeConfig.from_yaml(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        RuntimeConfig.from_yaml(broken)


def _write_hf_folder(folder: Path, config: dict) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))


def test_config_json_problems_are_named(tmp_path: Path) -> None:
    base = SYNTHETIC_PRESETS["tiny-llama"].to_hf_config()
    without_layers = {k: v for k, v in base.items() if k != "num_hidden_layers"}
    with pytest.raises(ModelLoadError, match="required field 'num_hidden_layers' is missing"):
        ModelArch.from_hf_config(without_layers)
    with pytest.raises(ModelLoadError, match="model_type 'gpt2' is not supported"):
        ModelArch.from_hf_config({**base, "model_type": "gpt2"})
    with pytest.raises(ModelLoadError, match="rope_scaling type 'yarn' is not supported"):
        ModelArch.from_hf_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ModelLoadError, match="multiple of num_key_value_heads"):
        ModelArch.from_hf_config({**base, "num_key_value_heads": 3})


def test_folder_problems_are_named(tmp_path: Path) -> None:
    cfg = tiny_config().model
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(cfg.model_copy(update={"uri": f"file://{tmp_path}/nowhere"}), "cpu")
    _write_hf_folder(tmp_path / "m", SYNTHETIC_PRESETS["tiny-llama"].to_hf_config())
    with pytest.raises(ModelLoadError, match=r"no \*.safetensors weights"):
        load_model(cfg.model_copy(update={"uri": f"file://{tmp_path}/m"}), "cpu")
    (tmp_path / "m" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}})
    )
    with pytest.raises(ModelLoadError, match=r"shards listed in model\.safetensors\.index\.json are missing"):
        load_model(cfg.model_copy(update={"uri": f"file://{tmp_path}/m"}), "cpu")


def test_pvc_uris_resolve_under_the_mount_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIGGYBACK_PVC_MOUNT_ROOT", str(tmp_path))
    with pytest.raises(ModelLoadError, match=f"model folder {tmp_path}/claim/llama does not exist"):
        load_model(tiny_config("pvc://claim/llama").model, "cpu")


def test_unsupported_dtypes_and_lengths_are_refused() -> None:
    with pytest.raises(ModelLoadError, match="float16 is not supported on the CPU"):
        resolve_dtype("float16", torch.device("cpu"), None)
    assert resolve_dtype("auto", torch.device("cpu"), "bfloat16") == torch.float32
    with pytest.raises(ModelLoadError, match="max_model_len 4096 is longer than the model allows"):
        load_model(tiny_config().model.model_copy(update={"max_model_len": 4096}), "cpu")
    with pytest.raises(ModelLoadError, match="not a known preset"):
        load_model(tiny_config("synthetic://gpt-9").model, "cpu")


def test_synthetic_presets_have_real_shapes() -> None:
    assert SYNTHETIC_PRESETS["llama-3-8b"].num_parameters() == pytest.approx(8.03e9, rel=0.01)
    assert SYNTHETIC_PRESETS["llama-2-70b"].num_parameters() == pytest.approx(69.0e9, rel=0.01)
    assert SYNTHETIC_PRESETS["llama-2-70b"].kv_bytes_per_token(2) == 320 * 1024


def test_synthetic_weights_are_deterministic() -> None:
    a = load_model(tiny_config().model, "cpu").model.state_dict()
    b = load_model(tiny_config().model, "cpu").model.state_dict()
    c = load_model(tiny_config().model.model_copy(update={"seed": 1}), "cpu").model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], c["model.layers.0.mlp.up_proj.weight"])


def test_builtin_tokenizer_round_trips_text_and_renders_chat() -> None:
    tokenizer = load_model(tiny_config().model, "cpu").tokenizer
    text = "Hello, wörld! 🚀 1234"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids) == text
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert rendered.startswith("<|begin_of_text|><|start_header_id|>user")
    assert rendered.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_the_test_config_builder_overrides_only_the_fields_it_is_given(
    make_runtime_config: Callable[..., RuntimeConfig],
) -> None:
    base = make_runtime_config()
    config = make_runtime_config(policy="headroom", model={"max_model_len": 96}, engine={"block_size": 8})
    assert (config.model.uri, config.model.max_model_len) == (base.model.uri, 96)
    assert (config.engine.policy, config.engine.block_size) == ("headroom", 8)
    assert config.engine.max_num_seqs == base.engine.max_num_seqs and config.piggyback == base.piggyback
    assert [s.name for s in config.services] == ["chat", "batch"]
