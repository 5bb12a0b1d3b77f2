"""The build itself: the package imports without a GPU, and the CUDA backend is never silently skipped."""
import os
import shutil

import alexnet_cuda as ax


def _nvcc_present():
    return bool(shutil.which("nvcc") or os.environ.get("CUDACXX") or os.path.exists("/usr/local/cuda/bin/nvcc"))


def test_cuda_backend_compiled_where_nvcc_exists():
    if os.environ.get("ALEXNET_CUDA", "AUTO").upper() == "OFF":
        assert not ax.built_with_cuda()
        return
    if _nvcc_present():
        assert ax.built_with_cuda(), "nvcc is on this machine but the CUDA backend was not compiled"


def test_cuda_available_explains_itself():
    if ax.cuda_available():
        assert ax.cuda_unavailable_reason() == ""
        assert ax.cuda_device_count() >= 1
    else:
        reason = ax.cuda_unavailable_reason()
        assert reason, "cuda_available() is False but no reason was given"
        assert any(w in reason for w in ("driver", "device", "built without CUDA", "runtime"))
