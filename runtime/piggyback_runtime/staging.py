"""Host <-> device transfers that never make the host wait for the device.

`HostStaging` packs several host tensors (token ids, positions, attention metadata, BE row indices, sampling
parameters) into one buffer of 32-bit words, pinned when the device is a GPU, and uploads it in one non-blocking copy;
each part comes back as a device view with its own dtype and shape (bit casts and conversions run on the
device). `to_host_async` is the way down: non-blocking copies into pinned memory on a side stream, and an
event that whoever needs the data (the CPU attention sender thread, never the engine) waits on.

Device kinds:
- cuda: as above. A pinned block returns to torch's caching host allocator only once the copies that read
  it have completed, so a fresh buffer per call is cheap and never overwritten under a copy in flight.
- cpu (the CPU is the accelerator): no copy at all; the host tensors are the device tensors.
- meta (the sync-check tests: a device with no data, where reading any value raises): uploads work as
  on a GPU; data coming down is zeros of the right shape, because there is none to read.
"""

from __future__ import annotations

import torch

_WORD = torch.int32  # the staging buffer's element: int32/int64 indices fit, float32 bit-casts, float64 takes two


class HostStaging:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._words: list[torch.Tensor] = []
        self._layout: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}  # name -> offset, words, dtype
        self._size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Stage a host tensor (int32/int64 values must fit in 32 bits: token ids, slots, positions, rows)."""
        if name in self._layout:
            raise ValueError(f"staged tensor {name!r} added twice")
        tensor = tensor.detach().contiguous()
        if tensor.device.type != "cpu":
            raise ValueError(f"staged tensor {name!r} is on {tensor.device}; stage host tensors only")
        if tensor.dtype == torch.float64:
            if self._size % 2:  # a float64 view needs an even word offset
                self._append(torch.zeros(1, dtype=_WORD))
            words = tensor.reshape(-1).view(_WORD)
        elif tensor.dtype == torch.float32:
            words = tensor.reshape(-1).view(_WORD)
        elif tensor.dtype in (torch.int64, torch.int32, torch.bool):
            words = tensor.reshape(-1).to(_WORD)
        else:
            raise ValueError(f"staged tensor {name!r}: dtype {tensor.dtype} is not supported")
        self._layout[name] = (self._size, words.numel(), tensor.dtype, tuple(tensor.shape))
        self._append(words)

    def _append(self, words: torch.Tensor) -> None:
        self._words.append(words)
        self._size += words.numel()

    def upload(self) -> dict[str, torch.Tensor]:
        """One copy of everything staged to the device (non-blocking from pinned memory on a GPU)."""
        pinned = self.device.type == "cuda"
        host = torch.empty(self._size, dtype=_WORD, pin_memory=pinned)
        if self._words:
            torch.cat(self._words, out=host)
        on_device = host if self.device.type == "cpu" else host.to(self.device, non_blocking=True)
        views: dict[str, torch.Tensor] = {}
        for name, (offset, count, dtype, shape) in self._layout.items():
            words = on_device[offset : offset + count]
            if dtype in (torch.float64, torch.float32):
                views[name] = words.view(dtype).view(shape)
            else:
                views[name] = words.to(dtype).view(shape)
        return views


def register_host_memory(tensor: torch.Tensor) -> None:
    """Page-lock an existing host tensor (e.g. shared memory the CPU workers write) for the CUDA driver, so a
    non-blocking copy from it is a true asynchronous DMA instead of a staged, host-blocking one."""
    size_bytes = tensor.untyped_storage().nbytes()
    error = int(torch.cuda.cudart().cudaHostRegister(tensor.untyped_storage().data_ptr(), size_bytes, 0))
    if error != 0:
        raise RuntimeError(
            f"cudaHostRegister of {size_bytes / 2**20:.1f} MiB of shared memory failed (cudaError {error}); the "
            "process may be over its locked-memory limit (ulimit -l) or the memory is registered already"
        )


def unregister_host_memory(tensor: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(tensor.untyped_storage().data_ptr())


_copy_streams: dict[int, torch.cuda.Stream] = {}


def to_host_async(*tensors: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.cuda.Event | None]:
    """Device tensors -> host tensors and an event that completes when they have landed (None: already there).

    On a GPU the copies run on a side stream that first waits for the compute that produced them, so they
    overlap the next layer's compute; the engine never waits on the event.
    """
    device = tensors[0].device
    if device.type == "cpu":
        return tensors, None
    if device.type != "cuda":  # meta: nothing to read (see the module docstring)
        return tuple(torch.zeros(t.shape, dtype=t.dtype) for t in tensors), None
    stream = _copy_streams.get(device.index or 0)
    if stream is None:
        stream = _copy_streams[device.index or 0] = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))  # the copies read what this layer just computed
    host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors)
    with torch.cuda.stream(stream):
        for dst, src in zip(host, tensors, strict=True):
            dst.copy_(src, non_blocking=True)
            src.record_stream(stream)  # keep the source alive for the copy, whatever the allocator does
        event = torch.cuda.Event()
        event.record(stream)
    return host, event
