"""The Poisson-subsampled DP-SGD trainer (framework-neutral loop + torch / JAX backends).

Backends are imported lazily so that the loop needs neither framework.
"""
from .loop import Trainer, TrainResult


def __getattr__(name):
    if name == "TorchBackend":
        from .torch_backend import TorchBackend

        return TorchBackend
    if name == "JaxBackend":
        from .jax_backend import JaxBackend

        return JaxBackend
    raise AttributeError(name)


__all__ = ["Trainer", "TrainResult", "TorchBackend", "JaxBackend"]
