"""Where and how tensors run: device choice, loader workers, mixed precision, autocast and channels-last."""
import contextlib
import os

import torch

from .recipe import PRECISIONS


def resolve_device(device=None) -> torch.device:
    """The requested device, else CUDA when available, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_workers() -> int:
    """Loader workers: none on CPU (the model needs both cores), up to 8 with a GPU."""
    return min(8, os.cpu_count() or 1) if torch.cuda.is_available() else 0


def dls_on_cuda(dls) -> bool:
    """True when the DataLoaders put batches on a CUDA device."""
    device = getattr(dls, "device", None)
    return torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")


def resolve_precision(precision: str, cuda: bool) -> str:
    """'bf16', 'fp16' or 'fp32': 'auto' is bf16 where supported, else fp16, on CUDA; always fp32 on CPU."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; choose one of {list(PRECISIONS)}")
    if not cuda:
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def autocast(device: torch.device, precision: str = "auto"):
    """bf16/fp16 autocast on CUDA per `precision`; a no-op context on CPU or with 'fp32'."""
    mode = resolve_precision(precision, device.type == "cuda")
    if mode == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if mode == "bf16" else torch.float16)


def to_memory_format(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """channels-last, the layout the models run in on every device (faster convolutions on CUDA and CPU)."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x
