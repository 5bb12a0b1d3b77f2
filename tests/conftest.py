import numpy as np
import pytest

import alexnet_cuda as ax

CUDA_SKIP_REASON = ax.cuda_unavailable_reason() or ""


def pytest_collection_modifyitems(config, items):
    if ax.cuda_available():
        return
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
