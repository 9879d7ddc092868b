"""tuneq's C kernels: compiled once per machine by the system's C compiler into a cache folder
(``TUNEQ_KERNEL_CACHE``, else ``$TUNEQ_DATA_DIR/kernels``) and loaded with ctypes.

Each kernel's module (``cpu_attention``, ``cpu_attention_f32``, ``cpu_norm``, ``cpu_dropout``,
``cpu_adamw_rows``) says what it computes and where it runs, and describes its C file as a
:class:`Kernel`; this one owns what they share: reading the CPU's flags, deciding whether a
kernel can run in this process, and building a source file into a shared library. ``python -m
tuneq.worker.ml.kernels`` builds every kernel, whichever this CPU runs (the image's build step,
so that a slim image needs no compiler at run time).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from tuneq.schemas.settings import load_settings

log = logging.getLogger(__name__)

X86 = ("x86_64", "amd64")
# What the AVX512-BF16 kernels (attention, norm) are compiled with, and need of the CPU
AVX512_BF16 = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma")
AVX512_BF16_CPU = ("avx512f", "avx512_bf16")
LIBRARY = ("-fopenmp", "-fPIC", "-shared")  # every kernel: a shared library on torch's OpenMP


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The words of ``cpuinfo`` (default: /proc/cpuinfo's), which include the CPU's flags."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    return set(cpuinfo.split())


def cannot_run(
    setting: str, enabled: bool, required: tuple[str, ...], cpuinfo: str | None = None
) -> str | None:
    """Why a kernel behind the setting ``setting`` (on where ``enabled``), which needs the CPU
    flags ``required``, cannot run in this process; None where it can."""
    if not enabled:
        return f"TUNEQ_{setting.upper()} is off"
    if platform.machine().lower() not in X86:
        return f"the CPU is {platform.machine()}, not x86-64"
    flags = cpu_flags(cpuinfo)
    if not flags:
        return "no /proc/cpuinfo to read the CPU's flags from"
    missing = [flag for flag in required if flag not in flags]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    if "OpenMP" not in torch.__config__.parallel_info():
        return "torch is not built with OpenMP, whose threads the kernels share"
    return None


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build(source: Path, flags: tuple[str, ...], folder: Path | None = None) -> Path:
    """``source`` compiled with ``flags`` into a shared library, built on first use; named by a
    digest of the source and the flags, so a changed source is rebuilt, a folder built in
    advance (an image's) needs no compiler, and concurrent workers share one file (each writes
    its own and renames it into place)."""
    digest = hashlib.sha256(source.read_bytes() + " ".join(flags).encode()).hexdigest()
    folder = folder or load_settings().kernel_cache
    target = folder / f"{source.stem}-{digest[:16]}.so"
    if target.is_file():
        return target
    cc = compiler()
    if cc is None:
        raise OSError(f"no C compiler (CC, cc or gcc) to build it into {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        subprocess.run(
            [cc, *flags, "-o", str(partial), str(source)],
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def load(source: Path, flags: tuple[str, ...], reason: str | None) -> ctypes.CDLL | str:
    """``source`` built (:func:`build`) and loaded where ``reason`` (why it cannot run here) is
    None; otherwise, or where building or loading fails, why it is not loaded."""
    if reason is not None:
        return reason
    try:
        return ctypes.CDLL(str(build(source, flags)))
    except subprocess.CalledProcessError as error:
        return f"building it failed: {error.stderr.strip()[-500:]}"
    except (OSError, subprocess.SubprocessError) as error:
        return f"building or loading it failed: {error}"


@dataclass(frozen=True)
class Kernel:
    """One of tuneq's C kernels: its ``source`` file, compiled with ``flags``, runs where the
    CPU has ``cpu_flags`` and the boolean setting ``setting`` (``TUNEQ_<SETTING>``) is on;
    elsewhere ``instead`` runs (what the log says, e.g. "dropout on torch's kernel")."""

    source: Path
    flags: tuple[str, ...]
    cpu_flags: tuple[str, ...]
    setting: str
    instead: str

    def unavailable(self, cpuinfo: str | None = None) -> str | None:
        """Why the kernel cannot run in this process (``cpuinfo``: /proc/cpuinfo's text, by
        default this machine's), or None where it can."""
        enabled = getattr(load_settings(), self.setting)
        return cannot_run(self.setting, enabled, self.cpu_flags, cpuinfo)

    def build(self, folder: Path | None = None) -> Path:
        """The compiled kernel (see :func:`build`)."""
        return build(self.source, self.flags, folder)

    def load(self) -> ctypes.CDLL | None:
        """The compiled kernel, loaded; None, logged with the reason, where it cannot run or
        does not build. Each module caches what it loads (and declares its entry points)."""
        loaded = load(self.source, self.flags, self.unavailable())
        if isinstance(loaded, str):
            log.info("%s: tuneq's kernel is off here (%s)", self.instead, loaded)
            return None
        return loaded


if __name__ == "__main__":  # the image's build step: every kernel, into TUNEQ_KERNEL_CACHE
    from tuneq.worker.ml import (
        cpu_adamw_rows,
        cpu_attention,
        cpu_attention_f32,
        cpu_dropout,
        cpu_norm,
    )

    for module in (cpu_attention, cpu_attention_f32, cpu_dropout, cpu_norm, cpu_adamw_rows):
        print(module.KERNEL.build())
