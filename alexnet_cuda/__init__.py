"""alexnet_cuda: from-scratch CUDA kernels and a two-tower model-parallel trainer for the 2012 AlexNet.

The compiled core is ``alexnet_cuda._C``; this package re-exports it. The CPU backend always works; the
CUDA backend needs a build with nvcc and a GPU at run time (``cuda_available()`` / ``cuda_unavailable_reason()``).
"""
from . import _C
from ._C import (  # noqa: F401
    Tensor,
    built_with_cuda,
    cpu_allocator_stats,
    cpu_empty_cache,
    cpu_reset_peak_stats,
    cpu_trim_cache,
    cuda_allocator_stats,
    cuda_available,
    cuda_device_count,
    cuda_device_properties,
    cuda_empty_cache,
    cuda_reset_peak_stats,
    cuda_unavailable_reason,
    from_numpy,
    ops,
    set_poison_allocations,
    synchronize,
)

from .config import NET_DEFAULTS, TRAIN_DEFAULTS, alexnet_config, tiny_config  # noqa: E402,F401
from .net import Net  # noqa: E402,F401

from ._version import __version__  # noqa: E402,F401
