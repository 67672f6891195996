"""Build llama.cpp's tools once (Release, CPU, no network code), cached in ~/.cache/llmquant/llama.cpp
(or $LLMQUANT_LLAMA_CACHE): one build serves every checkout, clean CI clones included. The first build
takes about 15-25 minutes on 2 cores; the tests that compare with llama.cpp's tools call it.

The sources are the llama.cpp vendored in llama-cpp-python 0.3.36, the same version llmquant's
runtime links, so both sides run the same kernels. If /tmp/src is missing the sdist is fetched
with pip and unpacked under bench/.cache/.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

VERSION = "0.3.36"
CACHE = Path(os.environ.get("LLMQUANT_LLAMA_CACHE") or Path.home() / ".cache" / "llmquant" / "llama.cpp")
SRC_CANDIDATES = [Path(f"/tmp/src/llama_cpp_python-{VERSION}/vendor/llama.cpp"),
                  CACHE / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"]


def llama_cpp_source() -> Path:
    for path in SRC_CANDIDATES:
        if (path / "CMakeLists.txt").is_file():
            return path
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={VERSION}", "-d", str(CACHE)], check=True)
    sdist = CACHE / f"llama_cpp_python-{VERSION}.tar.gz"
    with tarfile.open(sdist) as tar:
        tar.extractall(CACHE, filter="data")
    return SRC_CANDIDATES[1]


def build_tool(target: str = "llama-perplexity", jobs: int = 2) -> Path:
    """Path of the built tool; configures and builds only ``target`` the first time."""
    build = CACHE / f"llama.cpp-{VERSION}-build"
    exe = build / "bin" / target
    if exe.is_file():
        return exe
    src = llama_cpp_source()
    subprocess.run([
        "cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
        "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DBUILD_SHARED_LIBS=OFF",
    ], check=True)
    subprocess.run(["cmake", "--build", str(build), "--config", "Release", "--target", target,
                    f"-j{jobs}"], check=True)
    if not exe.is_file():
        raise SystemExit(f"build finished but {exe} is missing")
    return exe


if __name__ == "__main__":
    print(build_tool())
