import os

import numpy as np
import pytest

import alexnet_cuda as ax

CUDA_SKIP_REASON = ax.cuda_unavailable_reason() or ""


def pytest_collection_modifyitems(config, items):
    if ax.cuda_available():
        return
    if os.environ.get("ALEXNET_REQUIRE_CUDA", "0") not in ("", "0"):
        # The GPU check sets this: there a CUDA test that skips is a failure, not a pass (e.g. under a
        # compute-sanitizer that cannot see the device).
        pytest.exit(f"ALEXNET_REQUIRE_CUDA is set but CUDA is unavailable: {CUDA_SKIP_REASON}", returncode=3)
    skip = pytest.mark.skip(reason=f"needs a GPU: {CUDA_SKIP_REASON}")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def poison_outputs():
    """Every allocation is filled with NaN bytes so an output element a kernel never writes fails."""
    ax.set_poison_allocations(True)
    yield
    ax.set_poison_allocations(False)


@pytest.fixture
def rng(request):
    """A fresh generator per test; the seed is printed on failure so a failing draw can be replayed."""
    seed = np.random.SeedSequence().entropy % (2**32)
    request.node.user_properties.append(("seed", seed))
    print(f"rng seed {seed}")
    return np.random.default_rng(seed)


def devices():
    """Backends to parametrize over: the CPU always, CUDA marked so it skips with a reason without a GPU."""
    return ["cpu", pytest.param("cuda:0", marks=pytest.mark.cuda)]
