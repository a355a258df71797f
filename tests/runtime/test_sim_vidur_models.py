"""`device.model` takes any model with Vidur-format timings (sim/devices.resolve_vidur_model, issue #26 §4):
a preset name, a folder with a Hugging Face config.json (its `_name_or_path`, or `device.vidur_model`, names
the folder under profiling/compute/<gpu>/), or a model name as the Vidur data lays it out. A missing piece
is an error naming the path looked at."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from piggyback_runtime.config import ConfigError
from piggyback_runtime.model.arch import synthetic_arch
from piggyback_runtime.sim import devices
from piggyback_runtime.sim.scenario import DeviceConfig, HostConfig, build_device, load_scenario

VIDUR = devices.default_vidur_dir()
LLAMA3 = "meta-llama/Meta-Llama-3-8B"  # measured on the A100 only
LLAMA2 = "meta-llama/Llama-2-7b-hf"


@pytest.fixture
def vidur() -> Path:
    if not (VIDUR / "profiling").is_dir():
        pytest.skip(f"Vidur data not found at {VIDUR} (expected ../shared/data/vidur or ${devices.VIDUR_DIR_ENV})")
    return VIDUR


def gpu_device(**fields: Any) -> DeviceConfig:
    return DeviceConfig(host=HostConfig(preset="dgx-a100"), **fields)


def hf_config(preset: str, **extra: Any) -> dict[str, Any]:
    """The config.json Hugging Face ships with the model `preset` is the shape of."""
    return {**synthetic_arch(preset).to_hf_config(), **extra}


def model_folder(tmp_path: Path, config: dict[str, Any] | None) -> Path:
    folder = tmp_path / "downloaded-model"
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.slow  # seconds: reads and fits Vidur's profiling tables
def test_a_folder_with_a_config_json_is_timed_by_the_vidur_folder_its_name_or_path_names(
    tmp_path: Path, vidur: Path
) -> None:
    folder = model_folder(tmp_path, hf_config("llama-3-8b", _name_or_path=LLAMA3))
    from_folder = devices.build_gpu_profile("a100", str(folder), data_dir=vidur)
    preset = devices.build_gpu_profile("a100", "llama-3-8b", data_dir=vidur)
    assert from_folder.shape.vidur_dir == LLAMA3 and from_folder.shape.num_layers == 32
    assert from_folder.latency_model == preset.latency_model  # the same measured rows, the same shape
    assert devices.build_gpu_profile("a100", f"file://{folder}", data_dir=vidur).latency_model == preset.latency_model


@pytest.mark.slow  # seconds: reads and fits Vidur's profiling tables
def test_device_vidur_model_names_the_timings_of_a_folder_without_name_or_path(tmp_path: Path, vidur: Path) -> None:
    folder = model_folder(tmp_path, hf_config("llama-2-7b"))
    config = gpu_device(gpu="h100", model=str(folder), vidur_model=LLAMA2, data_dir=str(vidur))
    profile = build_device(config)
    assert profile.shape.vidur_dir == LLAMA2
    assert profile.latency_model == devices.build_gpu_profile("h100", "llama-2-7b", data_dir=vidur).latency_model
    # A folder relative to the scenario file, as runtime_profile is.
    relative = gpu_device(gpu="h100", model=folder.name, vidur_model=LLAMA2, data_dir=str(vidur))
    assert build_device(relative, base_dir=tmp_path).latency_model == profile.latency_model


@pytest.mark.slow  # seconds: reads and fits Vidur's profiling tables
def test_a_vidur_model_name_takes_the_shape_of_the_preset_with_that_folder(vidur: Path) -> None:
    assert devices.resolve_vidur_model(LLAMA3, "a100", vidur) is devices.MODELS["llama-3-8b"]
    profile = build_device(gpu_device(gpu="a100", model=LLAMA3, data_dir=str(vidur)))
    assert profile.latency_model == devices.build_gpu_profile("a100", "llama-3-8b", data_dir=vidur).latency_model


def test_a_vidur_model_name_no_preset_knows_takes_its_shape_from_a_config_json_in_the_data(
    tmp_path: Path, vidur: Path
) -> None:
    # A model profiled with Vidur's tools and added to the data: its mlp.csv and its config.json.
    data = tmp_path / "vidur"
    added = data / "profiling" / "compute" / "h100" / "acme" / "Llama-7b-finetune"
    added.mkdir(parents=True)
    shutil.copy(vidur / "profiling" / "compute" / "h100" / LLAMA2 / "mlp.csv", added / "mlp.csv")
    (added / "config.json").write_text(json.dumps(hf_config("llama-2-7b")))
    profile = devices.build_gpu_profile("h100", "acme/Llama-7b-finetune", data_dir=data)
    assert profile.shape.name == "acme/Llama-7b-finetune" and profile.shape.num_layers == 32
    assert profile.latency_model == devices.build_gpu_profile("h100", "llama-2-7b", data_dir=vidur).latency_model


# --- a missing piece names the path it looked for ----------------------------------------------------------------
def test_a_folder_without_config_json_names_the_file_it_looked_for(tmp_path: Path, vidur: Path) -> None:
    folder = model_folder(tmp_path, None)
    with pytest.raises(ConfigError, match=re.escape(f"{folder / 'config.json'}: no such file")):
        build_device(gpu_device(gpu="a100", model=str(folder), data_dir=str(vidur)))


def test_a_folder_whose_config_names_no_vidur_model_says_to_set_device_vidur_model(
    tmp_path: Path, vidur: Path
) -> None:
    folder = model_folder(tmp_path, hf_config("llama-2-7b"))
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'config.json'}: no _name_or_path")) as error:
        devices.build_gpu_profile("a100", str(folder), data_dir=vidur)
    message = str(error.value)
    assert "device.vidur_model" in message and str(vidur / "profiling" / "compute" / "a100") in message


def test_a_model_with_no_timings_on_that_gpu_names_the_file_and_the_models_measured_there(
    tmp_path: Path, vidur: Path
) -> None:
    folder = model_folder(tmp_path, hf_config("llama-3-8b", _name_or_path=LLAMA3))
    expected = vidur / "profiling" / "compute" / "h100" / LLAMA3 / "mlp.csv"
    with pytest.raises(ConfigError, match=re.escape(f"{expected}: no such file")) as error:
        build_device(gpu_device(gpu="h100", model=str(folder), data_dir=str(vidur)))
    assert LLAMA2 in str(error.value)  # what the H100 does have


def test_a_tp_degree_without_timings_names_the_file_and_the_degrees_measured(tmp_path: Path, vidur: Path) -> None:
    folder = model_folder(tmp_path, hf_config("llama-3-8b", _name_or_path=LLAMA3))
    expected = vidur / "profiling" / "compute" / "a100" / LLAMA3 / "mlp.csv"
    with pytest.raises(ConfigError, match=re.escape(f"{expected}: no rows for TP 3; TP degrees measured: [1, 2, 4")):
        build_device(gpu_device(gpu="a100", model=str(folder), tp=3, data_dir=str(vidur)))


def test_a_vidur_model_name_without_a_shape_names_the_config_json_it_looked_for(vidur: Path) -> None:
    expected = vidur / "profiling" / "compute" / "a100" / "acme" / "unknown-13b" / "config.json"
    with pytest.raises(ValueError, match=re.escape(f"{expected} does not exist")):
        devices.build_gpu_profile("a100", "acme/unknown-13b", data_dir=vidur)


def test_an_unknown_name_lists_the_presets_and_the_other_forms() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'gpt-5'; known models: llama-2-7b.*yi-34b; or a folder"):
        devices.resolve_vidur_model("gpt-5", "h100")


def test_a_shape_that_differs_from_the_named_timings_is_refused(tmp_path: Path, vidur: Path) -> None:
    folder = model_folder(tmp_path, hf_config("llama-2-7b", _name_or_path=LLAMA3))  # 7B shape, 8B timings
    with pytest.raises(ValueError, match=re.escape(f"{LLAMA3}/mlp.csv: does not match model")):
        devices.build_gpu_profile("a100", str(folder), data_dir=vidur)


def test_vidur_model_is_only_for_a_gpu_device() -> None:
    runtime = {"model": {"uri": "synthetic://tiny-llama"}, "services": [{"name": "batch", "class": "BE"}]}
    device = {"runtime_profile": "profile.json", "model": "synthetic://tiny-llama", "vidur_model": LLAMA2}
    workload = {"duration_s": 1, "sources": [{"kind": "batch", "service": "batch", "class": "BE", "count": 1,
                                              "lengths": {"kind": "fixed", "prompt_tokens": 8, "output_tokens": 8}}]}
    with pytest.raises(ConfigError, match=r"device\.vidur_model"):
        load_scenario({"runtime": runtime, "device": device, "workload": workload})
