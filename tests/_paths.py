"""Shared test helpers for choosing which implementation a dpprims op runs (imported by tests;
tests/ is on sys.path under pytest's default import mode)."""
import contextlib
import os

import pytest
import torch


@contextlib.contextmanager
def plain_torch_path():
    """Run dpprims ops on CPU tensors through their plain-torch implementation (the backend is
    chosen per call from TRITON_INTERPRET, see bindings/torch/_backend.py)."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


@pytest.fixture
def one_torch_thread():
    """torch int64 kernels on a loaded 2-core box are much faster single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
