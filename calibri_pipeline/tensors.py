"""Tensor-memory helpers every model loader uses (the backbones and the MiniLM text encoder)."""

from __future__ import annotations

from typing import Iterable

import torch

#: bytes: PyTorch's CPU allocator aligns every fresh tensor to this (one AVX-512 register)
CPU_ALIGNMENT = 64


def _misplaced(t: torch.Tensor) -> bool:
    """A plain CPU tensor whose memory a fresh allocation would not give: unaligned or not contiguous."""
    return (
        type(t) is torch.Tensor
        and t.device.type == "cpu"
        and t.numel() > 0
        and (t.data_ptr() % CPU_ALIGNMENT != 0 or not t.is_contiguous())
    )


def realign_cpu_weights(modules: Iterable[torch.nn.Module]) -> int:
    """Copy every CPU parameter and buffer of ``modules`` that is unaligned or strided into fresh memory.

    Values do not change (a copy) and parameters stay the same ``Parameter`` objects (only ``.data`` is
    replaced), so hooks and calibration spaces that hold them keep working; GPU tensors and tensor
    subclasses (quantised weights) are left alone. Returns how many tensors were copied.
    """
    # mmap-ed safetensors weights are not 64-byte aligned, and CPU GEMM/SDPA kernels round differently on them
    copied = 0
    seen: set[int] = set()
    for component in modules:
        for param in component.parameters():
            if id(param) in seen:
                continue
            seen.add(id(param))
            if _misplaced(param.data):
                param.data = param.data.clone(memory_format=torch.contiguous_format)
                copied += 1
        copies: dict[int, torch.Tensor] = {}  # one copy per buffer: a buffer shared by modules stays shared
        for module in component.modules():
            for name, buffer in list(module.named_buffers(recurse=False)):
                if id(buffer) not in copies:
                    if not _misplaced(buffer):
                        continue
                    copies[id(buffer)] = buffer.clone(memory_format=torch.contiguous_format)
                setattr(module, name, copies[id(buffer)])
        copied += len(copies)
    return copied


def weights_fingerprint(module: torch.nn.Module, per_tensor: int = 256) -> str:
    """A cheap digest of a model's weights: names, shapes, dtypes and ``per_tensor`` evenly spaced values.

    Any fine-tune or other checkpoint changes it; hashing every byte of a 24 GB FLUX would take a
    minute, this takes milliseconds.
    """
    import hashlib

    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // per_tensor)
        sample = flat[::step][:per_tensor].to("cpu", torch.float64)
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:24]


__all__ = ["CPU_ALIGNMENT", "realign_cpu_weights", "weights_fingerprint"]
