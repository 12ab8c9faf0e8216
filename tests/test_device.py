"""artlearn.device: device choice, precision, memory format and the CPU heap setting."""
import resource

import pytest
import torch

import artlearn.device as device_module
from artlearn.device import autocast, reuse_heap, reused_heap, resolve_device, resolve_precision, to_memory_format

GLIBC = reuse_heap(False)  # True under glibc, where the heap setting applies (and this also resets it)


def fresh_page_faults(n: int = 4, mib: int = 64) -> int:
    """Minor page faults while allocating, touching and freeing `n` tensors of `mib` MiB, one after another."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        t = torch.empty(mib * 2 ** 20, dtype=torch.uint8)
        t.fill_(1)
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not GLIBC, reason="the heap setting applies under glibc only")
def test_reused_heap_stops_refaulting_freed_memory():
    pages = 4 * 64 * 2 ** 20 // resource.getpagesize()
    default = fresh_page_faults()
    assert default >= pages // 4  # glibc maps the 64 MiB blocks fresh: their pages fault in again
    with reused_heap():
        fresh_page_faults(8)  # the heap grows (where brk is blocked glibc takes a few rounds to settle)
        reused = min(fresh_page_faults() for _ in range(3))
    assert reused < pages // 20  # the freed block is reused: (almost) no new faults
    assert fresh_page_faults() >= pages // 4  # glibc's defaults again after the block


@pytest.mark.skipif(not GLIBC, reason="the heap setting applies under glibc only")
def test_reused_heap_hands_memory_back_after_an_error():
    with pytest.raises(RuntimeError, match="boom"), reused_heap():
        fresh_page_faults(1)
        raise RuntimeError("boom")
    assert fresh_page_faults(4) >= 4 * 64 * 2 ** 20 // resource.getpagesize() // 4


@pytest.fixture(params=[True, False], ids=["native-bf16", "no-bf16"])
def native_bf16(request, monkeypatch):
    """Both kinds of CPU, whatever this one is: with and without native bf16."""
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: request.param)
    return request.param


def test_resolve_device_and_precision(native_bf16):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_precision("auto", cuda=False) == "fp32"  # the CPU trains in fp32 unless bf16 is asked for
    assert resolve_precision("fp16", cuda=False) == "fp32"  # torch's CPU fp16 is slower than fp32
    assert resolve_precision("bf16", cuda=False) == ("bf16" if native_bf16 else "fp32")
    assert resolve_precision("bf16", cuda=True) == "bf16"
    with pytest.raises(ValueError, match="precision='fp8'"):
        resolve_precision("fp8", cuda=False)


def test_cpu_native_bf16_is_what_onednn_reports():
    assert device_module.cpu_has_native_bf16() is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_autocast_on_cpu_is_bf16_only_when_asked_and_native(native_bf16):
    for precision in ("auto", "fp32", "fp16"):
        with autocast(torch.device("cpu"), precision):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with autocast(torch.device("cpu"), "bf16"):
        product = torch.ones(2, 2) @ torch.ones(2, 2)
    assert product.dtype == (torch.bfloat16 if native_bf16 else torch.float32)


def test_to_memory_format_makes_images_channels_last():
    x = torch.randn(2, 3, 8, 8)
    assert to_memory_format(x, torch.device("cpu")).is_contiguous(memory_format=torch.channels_last)
    assert to_memory_format(torch.randn(2, 5), torch.device("cpu")).shape == (2, 5)  # non-images pass through
