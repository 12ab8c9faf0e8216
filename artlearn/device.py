"""Where and how tensors run: device choice, loader workers, mixed precision, autocast, channels-last and the CPU
heap."""
import contextlib
import ctypes
import functools
import logging
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
    """'bf16', 'fp16' or 'fp32': 'auto' is bf16 where supported, else fp16, on CUDA and fp32 on the CPU; on the CPU
    'bf16' is bf16 autocast where the CPU computes bf16 natively (else fp32, faster than emulated bf16) and 'fp16'
    is fp32 (torch's CPU fp16 kernels are slower than fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not supported; choose one of {list(PRECISIONS)}")
    if not cuda:
        return "bf16" if precision == "bf16" and cpu_has_native_bf16() else "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 in hardware (AVX-512 BF16 or AMX, as oneDNN reports it); elsewhere torch
    emulates bf16 or falls back to reference kernels."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def autocast(device: torch.device, precision: str = "auto"):
    """bf16/fp16 autocast per `precision` (bf16 on the CPU too); a no-op context with 'fp32'."""
    mode = resolve_precision(precision, device.type == "cuda")
    if mode == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)


def to_memory_format(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """channels-last, the layout the models run in on every device (faster convolutions on CUDA and CPU)."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


# glibc's mallopt parameters (malloc.h) and their defaults. torch's CPU tensors come from malloc: blocks above the
# (at most 32 MiB) mmap threshold are mapped fresh and zero-filled by the kernel at every allocation, and freed heap
# above the trim threshold goes back to the kernel, so each training step page-faults its activations in again.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
KEEP_TRIM_THRESHOLD = 2 ** 31 - 1  # mallopt's largest value: free heap is kept while a fit runs
log = logging.getLogger(__name__)


@functools.cache
def _glibc():
    """The process's glibc (for mallopt/malloc_trim), or None under another C library (macOS, Windows, musl)."""
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # only glibc has it
            return None
        libc.mallopt.argtypes, libc.malloc_trim.argtypes = [ctypes.c_int, ctypes.c_int], [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError, TypeError):
        return None


def reuse_heap(on: bool) -> bool:
    """On: malloc keeps freed memory for reuse (no mmap'd blocks, no trimming); off: glibc's defaults again and the
    free heap handed back (malloc_trim). Not in torch, which has no caching allocator on the CPU. Returns whether
    the C library is glibc (elsewhere nothing changes)."""
    libc = _glibc()
    if libc is None:
        log.debug("not glibc: the CPU heap is left as it is")
        return False
    if on:
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, KEEP_TRIM_THRESHOLD)
    else:
        libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
        libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
    return True


@contextlib.contextmanager
def reused_heap():
    """Within the block, malloc reuses freed memory instead of faulting fresh pages in (`reuse_heap`)."""
    reuse_heap(True)
    try:
        yield
    finally:
        reuse_heap(False)
