"""Build specdec and its native extension ``specdec._C`` (pybind11, built by CMake).

The extension (the n-gram index) is optional at run time: without it specdec falls back
to pure Python with one warning. Device code is Triton, compiled at run time.
Set SPECDEC_NO_EXT=1 to skip native code entirely.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str, sourcedir: Path):
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


class CMakeBuild(build_ext):
    """Build CMake extensions with cmake; others the setuptools way."""

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
        ]
        subprocess.run(["cmake", ext.sourcedir, *cmake_args], cwd=build_temp, check=True)
        jobs = str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", ".", "--config", cfg, "-j", jobs], cwd=build_temp, check=True)


def native_extensions():
    if os.environ.get("SPECDEC_NO_EXT") == "1":
        return []
    if shutil.which("cmake"):
        return [CMakeExtension("specdec._C", ROOT)]
    from pybind11.setup_helpers import Pybind11Extension  # no cmake: same sources, plain setuptools

    return [Pybind11Extension("specdec._C", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp")),
                              cxx_std=17, include_dirs=["csrc"])]


setup(
    name="specdec",
    version="0.1.0",
    description="Lossless speculative decoding for Hugging Face causal language models",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["specdec", "specdec.*"]),
    package_data={"specdec": ["heads/*/head.json", "heads/*/head.safetensors"]},  # the shipped draft heads
    install_requires=["torch>=2.4", "transformers>=4.56", "numpy"],
    extras_require={"triton": ["triton"], "gguf": ["gguf"], "test": ["pytest"]},
    ext_modules=native_extensions(),
    cmdclass={"build_ext": CMakeBuild},
    entry_points={"console_scripts": ["specdec=specdec.cli:main"]},
    zip_safe=False,
)
