"""Build a C++ XLA FFI handler library from a source file next to this module, once per source
(with the headers next to it), compiler flags, compiler, jax and jaxlib versions and host, into the user cache (~/.cache/cfm_jax,
or $XDG_CACHE_HOME).

Built with the system C++ compiler ($CXX, c++ or g++) on first use, a second or two; the cached
library is reused after that. Flags may tune for this CPU (-march=native): the host in the cache key
includes the CPU model and its feature flags, so a home directory shared with another machine gets
its own build.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jaxlib.version


def _cpu() -> str:
    """CPU model and feature flags (Linux), or '' where /proc/cpuinfo is unreadable."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    keys = ("model name", "flags", "Features", "CPU part", "CPU implementer")  # x86 and Arm spellings
    return "\n".join(dict.fromkeys(x for x in lines if x.startswith(keys)))


def _compiler_version(cxx: str | None) -> str:
    if cxx is None:
        return ""
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    except (OSError, subprocess.SubprocessError):
        return ""


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def build(source: Path, flags: tuple[str, ...]) -> Path:
    """The compiled shared library of `source`; RuntimeError (one line) without a compiler or when
    compiling fails."""
    cxx = compiler()
    versions = f"{jax.__version__} {jaxlib.version.__version__} {_compiler_version(cxx)}"
    host = f"{versions} {sys.platform} {os.uname().machine} {os.uname().release} {_cpu()} {flags}"
    headers = sorted(source.parent.glob("*.h"))  # shared helpers the sources include
    code = b"".join(p.read_bytes() for p in (source, *headers))
    key = hashlib.sha256(code + host.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cfm_jax"
    lib = cache / f"{source.stem}-{key}.so"
    if lib.exists():
        return lib
    if cxx is None:
        raise RuntimeError(f"no C++ compiler (c++ or g++, or set CXX) to build {source.name}")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # built aside, then moved: concurrent builds are safe
        out = Path(tmp) / lib.name
        cmd = [cxx, *flags, "-shared", "-fPIC", "-std=c++17", "-w", f"-I{jax.ffi.include_dir()}", str(source), "-o", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"building {source.name} failed: {done.stderr.strip()[-300:]}")
        os.replace(out, lib)
    return lib


def load(source: Path, flags: tuple[str, ...], targets: dict[str, str]) -> ctypes.CDLL | str:
    """Build `source`, load it and register its FFI handlers for the CPU platform, as {target name:
    exported symbol}: the library, or why it cannot be had (one line)."""
    try:
        lib = ctypes.CDLL(str(build(source, flags)))
    except (OSError, RuntimeError) as e:
        return str(e).splitlines()[0]
    for name, symbol in targets.items():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return lib
