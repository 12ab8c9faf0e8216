"""Local randomness: fork the global RNG instead of reseeding the process."""


def fork_global_rng():
    """`torch.random.fork_rng` over the CPU and the current CUDA device only (restored on exit)."""
    import torch
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices, device_type="cuda")
