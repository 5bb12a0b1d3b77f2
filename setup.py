"""Builds alexnet_cuda._C through CMakeLists.txt (the pybind11 cmake_example pattern).

Environment:
  ALEXNET_CUDA        AUTO (default: build the CUDA backend when nvcc is found), ON (fail without nvcc), OFF
  ALEXNET_CUDA_ARCHS  CMake CUDA architectures, e.g. "86" or "80;90"; else CMake's CUDAARCHS; else SASS for
                      the common GPUs this nvcc supports (sm_75 ... sm_120) and PTX for sm_75
  CMAKE_BUILD_PARALLEL_LEVEL  compile jobs (default: all cores)
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
# One version, in alexnet_cuda/_version.py (read as text: the package cannot be imported before it is built).
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "alexnet_cuda" / "_version.py").read_text()).group(1)


def drop_stale_cmake_cache(build_temp: Path) -> None:
    """A CMakeCache.txt left by an earlier build whose tools are gone (pip's isolated build environment, with
    its cmake and ninja, is deleted after each build) makes the next configure fail: start that cache afresh."""
    cache = build_temp / "CMakeCache.txt"
    if not cache.is_file():
        return
    tools = re.findall(r"^(?:CMAKE_MAKE_PROGRAM|CMAKE_COMMAND|CMAKE_CXX_COMPILER|CMAKE_CUDA_COMPILER):[A-Z]+=(.+)$",
                       cache.read_text(errors="replace"), re.M)
    if all(Path(t.strip()).exists() for t in tools if t.strip() and not t.strip().endswith("-NOTFOUND")):
        return
    print(f"setup.py: {cache} names tools that no longer exist (an earlier isolated build): reconfiguring")
    cache.unlink()
    shutil.rmtree(build_temp / "CMakeFiles", ignore_errors=True)


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        drop_stale_cmake_cache(build_temp)
        cuda = os.environ.get("ALEXNET_CUDA", "AUTO").upper()
        if cuda not in ("AUTO", "ON", "OFF"):
            raise SystemExit(f"setup.py: ALEXNET_CUDA must be AUTO, ON or OFF, got {cuda!r}")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={extdir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DALEXNET_CUDA={cuda}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        try:
            import ninja  # noqa: F401

            args += ["-GNinja"]
        except ImportError:
            pass
        env = dict(os.environ)
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_temp, check=True, env=env)
        subprocess.run(["cmake", "--build", "."], cwd=build_temp, check=True, env=env)


# Guarded so that tests can import drop_stale_cmake_cache; pip and `python setup.py` run this file as __main__.
if __name__ == "__main__":
    setup(
        name="alexnet_cuda",
        version=VERSION,
        description="From-scratch CUDA kernels and a two-tower model-parallel trainer for the 2012 AlexNet",
        long_description=(ROOT / "README.md").read_text(),
        long_description_content_type="text/markdown",
        license="MIT",
        license_files=["LICENSE"],
        classifiers=[
            "Programming Language :: Python :: 3",
            "Programming Language :: C++",
            "Environment :: GPU :: NVIDIA CUDA",
            "Operating System :: POSIX :: Linux",
            "Topic :: Scientific/Engineering :: Artificial Intelligence",
        ],
        packages=["alexnet_cuda"],
        python_requires=">=3.9",
        entry_points={
            "console_scripts": [
                "alexnet-train = alexnet_cuda.train:main",
                "alexnet-prepare = alexnet_cuda.prepare:main",
                "alexnet-evaluate = alexnet_cuda.evaluate:main",
                "alexnet-predict = alexnet_cuda.predict:main",
                "alexnet-features = alexnet_cuda.features:main",
                "alexnet-weights = alexnet_cuda.weights:main",
            ]
        },
        install_requires=["numpy", "pillow"],
        extras_require={
            # cuobjdump and the nvdisasm it calls read the SASS for benchmarks/model.py (5.5 MB of NVIDIA wheels;
            # its tests skip the SASS check without them)
            "test": ["pytest", "nvidia-cuda-cuobjdump; platform_system == 'Linux'",
                     "nvidia-cuda-nvdisasm; platform_system == 'Linux'"],
            # Data-parallel training across processes (alexnet_cuda.distributed): mpi4py over the system's MPI
            # (Debian: apt-get install openmpi-bin libopenmpi-dev). NCCL, for CUDA tensors, is loaded at run time.
            "mpi": ["mpi4py"],
            "progress": ["tqdm"],
            "plot": ["matplotlib"],
        },
        ext_modules=[CMakeExtension("alexnet_cuda._C")],
        cmdclass={"build_ext": CMakeBuild},
        zip_safe=False,
    )
