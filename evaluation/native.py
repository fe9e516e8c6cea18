"""The decode attention's C++ products (``evaluation/decode_attention.cpp``), built on first use.

``kernels()`` compiles the file once per machine with PyTorch's extension builder (``torch.utils.cpp_extension``:
a C++ compiler and ``ninja``, a dependency of this project) into PyTorch's extension cache
(``$TORCH_EXTENSIONS_DIR``, ``~/.cache/torch_extensions`` by default), under a name that carries a hash of
this CPU's instruction-set flags (the build targets the CPU it runs on: ``-march=native``) and of the PyTorch
version (whose C++ interface it is built against); later processes load the built module. ``make setup``
builds it (``python -m evaluation.native``), so that no run pays the build (about 25 s on 2 cores).

Where it cannot be built (no compiler, no Python headers) or ``TRUTHSTEER_CPU_ATTENTION=torch`` is set,
``kernels()`` is None and the packed attention multiplies with PyTorch's ``bmm`` as before; a line says why,
once a process.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
from pathlib import Path
from typing import Any

import torch

SOURCE = Path(__file__).with_name("decode_attention.cpp")
OPT_OUT = "TRUTHSTEER_CPU_ATTENTION"  # =torch: the packed attention's products by PyTorch's bmm


def build_key() -> str:
    """A short hash of what the built module is for: this CPU (its architecture and, on Linux, the
    instruction-set flags it reports) and the PyTorch version it links against (venvs share the cache)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return hashlib.sha256(f"{platform.machine()} {flags} {torch.__version__}".encode()).hexdigest()[:12]


@functools.cache
def _built() -> Any | None:
    path = os.environ.get("PATH", "")
    try:
        from torch.utils import cpp_extension

        try:  # the ninja this project installs, on PATH while building, as PyTorch runs it from there
            import ninja

            os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, path])
        except ImportError:
            pass
        return cpp_extension.load(name=f"truthsteer_decode_attention_{build_key()}", sources=[str(SOURCE)],
                                  extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except Exception as e:  # a missing compiler, ninja or header: PyTorch's products instead
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        print(f"decode attention's C++ products not built ({reason[:200]}); using PyTorch's bmm", flush=True)
        return None
    finally:
        os.environ["PATH"] = path


def kernels() -> Any | None:
    """The built module (``scores``, ``weighted``), or None where it cannot be built or ``TRUTHSTEER_CPU_ATTENTION``
    is ``torch``."""
    if os.environ.get(OPT_OUT, "") == "torch":
        return None
    return _built()


if __name__ == "__main__":  # make setup: build it now (where it cannot be built, the line above says why)
    if _built() is not None:
        print(f"built {SOURCE.name} for this CPU and torch {torch.__version__} ({build_key()})")
