"""Local randomness: fork the global RNG instead of reseeding the process."""
import contextlib
import random


def fork_global_rng():
    """`torch.random.fork_rng` over the CPU and the current CUDA device only (restored on exit)."""
    import torch
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    return torch.random.fork_rng(devices=devices, device_type="cuda")


@contextlib.contextmanager
def keep_global_rng():
    """Restore Python's, numpy's and torch's global RNG states on exit (fastai draws from them building loaders)."""
    import numpy as np
    py_state, np_state = random.getstate(), np.random.get_state()
    with fork_global_rng():
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
