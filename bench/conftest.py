"""pytest-benchmark setup: on a GPU every timed call is followed by a device synchronisation, so the
timer measures the kernel rather than its launch."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def synced():
    """Wrap fn so a call returns only when the device is done: pass synced(fn) to `benchmark`."""

    def wrap(fn):
        if not torch.cuda.is_available():
            return fn

        def call(*args, **kwargs):
            out = fn(*args, **kwargs)
            torch.cuda.synchronize()
            return out

        return call

    return wrap
