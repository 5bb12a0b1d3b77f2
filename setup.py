"""Builds alexnet_cuda._C through CMakeLists.txt (the pybind11 cmake_example pattern).

Environment:
  ALEXNET_CUDA        AUTO (default: build the CUDA backend when nvcc is found), ON (fail without nvcc), OFF
  ALEXNET_CUDA_ARCHS  CMake CUDA architectures, default "90" (Hopper SASS + PTX)
  CMAKE_BUILD_PARALLEL_LEVEL  compile jobs (default: all cores)
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import pybind11

        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
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


setup(
    name="alexnet_cuda",
    version="0.1.0",
    description="From-scratch CUDA kernels and a two-tower model-parallel trainer for the 2012 AlexNet",
    packages=["alexnet_cuda"],
    python_requires=">=3.9",
    install_requires=["numpy", "pillow"],
    extras_require={
        "test": ["pytest"],
        "progress": ["tqdm"],
        "plot": ["matplotlib"],
    },
    ext_modules=[CMakeExtension("alexnet_cuda._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
