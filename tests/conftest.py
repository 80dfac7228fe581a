"""Test configuration.

Without a CUDA GPU the Triton kernels run through Triton's interpreter on CPU; that has to be
switched on before any kernel is defined, hence here, before dpprims is imported anywhere.
JAX runs on CPU with float64 enabled so the pure-JAX reference can serve as a float64 oracle.
"""
import os

import pytest


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # torch missing or broken: no CUDA either way
        return False


HAS_CUDA = _cuda_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    # Triton picks interpreter or compiled mode when a kernel is DEFINED: define every kernel now,
    # under the setting above, so that a test which sets TRITON_INTERPRET=0 for the plain-torch
    # path and happens to import a kernel module first cannot leave it compiled for the rest of
    # the session (the order dependence test_cli_errors -> test_readme had).
    import importlib
    import pkgutil

    import dpprims.kernels

    for _m in pkgutil.iter_modules(dpprims.kernels.__path__):
        importlib.import_module(f"dpprims.kernels.{_m.name}")

try:
    import jax

    jax.config.update("jax_enable_x64", True)
except ImportError:  # the JAX-based tests skip themselves
    pass


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run opt-in slow tests")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU: the compiled Triton kernels cannot run on this machine")
    skip_slow = pytest.mark.skip(reason="opt-in: pass --runslow")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)


@pytest.fixture
def device():
    """The device kernels under test run on: cuda when present, else cpu (interpreter)."""
    return "cuda" if HAS_CUDA else "cpu"
