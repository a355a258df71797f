"""Host staging asks for pinned (page-locked) host memory exactly when the accelerator is CUDA.

A non-blocking copy from pageable memory is staged by the driver through a pinned bounce buffer with the host
waiting, so the iteration's one upload is asynchronous only from pinned memory. The meta-device sync tests
cannot see this (meta has no host memory to pin), and this machine has no GPU to pin for: `torch.empty` is
replaced by a recorder that notes the `pin_memory` asked for and hands back ordinary memory whose upload
returns itself."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from piggyback_runtime import staging
from piggyback_runtime.staging import HostStaging

_real_empty = torch.empty


class _UploadsToItself(torch.Tensor):
    """Host memory standing in for a pinned buffer: `.to(<cuda>)` returns the data as an ordinary tensor."""

    def to(self, *args: Any, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        return self.as_subclass(torch.Tensor).clone()


def _recording_empty(asked: list[bool]) -> Any:
    def empty(*args: Any, pin_memory: bool = False, **kwargs: Any) -> torch.Tensor:
        asked.append(pin_memory)
        return _real_empty(*args, **kwargs).as_subclass(_UploadsToItself)

    return empty


@pytest.mark.parametrize(("device", "pinned"), [("cuda", True), ("cpu", False), ("meta", False)])
def test_the_upload_buffer_is_pinned_exactly_when_the_accelerator_is_cuda(
    device: str, pinned: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[bool] = []
    monkeypatch.setattr(staging.torch, "empty", _recording_empty(asked))
    step = HostStaging(torch.device(device))
    step.add("token_ids", torch.tensor([3, 1, 4], dtype=torch.long))
    step.add("temperature", torch.tensor([0.5, 1.0]))
    views = step.upload()
    assert asked == [pinned]  # one buffer for the whole upload, pinned on CUDA only
    if device != "meta":
        assert views["token_ids"].tolist() == [3, 1, 4] and views["temperature"].tolist() == [0.5, 1.0]
