"""Linear layers on a CPU by oneDNN while a model generates and scores.

PyTorch multiplies an fp32 ``nn.Linear`` on a CPU with its BLAS (MKL). On this project's 2-core AMD machine
oneDNN, which PyTorch also ships (``torch.ops.mkldnn._linear_pointwise``, what PyTorch's own compiler calls
for linear layers on a CPU), multiplies the same fp32 weights faster: the decode's narrow products (one
token for each of a batch's rows against the model's weights) and large squares alike
(``benchmarks.generate``: ``roof_gflops_by_library``, ``decode_shape_gflops_by_library``, and the layers
timed both ways in place). ``onednn_linears`` runs a model's fp32 linear layers through it until the block
exits; then the layers are as they were.

What it changes, and what it does not:
- the weights are read where they are: no copy of them is kept, except under ``laid_out_rows``: while a
  batch of prompts is answered (``evaluation.generate``), each weight is also held laid out for oneDNN
  (``torch.ops.mkldnn._reorder_linear_weight``, what PyTorch's compiler does for frozen models), a copy of
  every linear weight for the block (the smoke split generates 1.15x faster, ``benchmarks.generate``); not where
  that copy would take over half the memory available. Meanwhile the weight's own pages, once its first product
  on the copy is checked, leave resident memory where they are clean pages of the model's file
  (``core.models.unmap_file_pages``: 0.4 GiB of the smoke model), and map back from the page cache when read;
- the products are summed in another order than MKL's: they agree to float32 rounding, not bit for bit,
  and each layer's first product in a block is checked against PyTorch's on one row (``check_product``);
- a layer falls back to ``torch.nn.functional.linear`` with gradients on, and on an input that is not fp32
  on a CPU or is empty;
- ``TRUTHSTEER_CPU_LINEAR=torch`` keeps PyTorch's own linear layers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from core.models import unmap_file_pages

OPT_OUT = "TRUTHSTEER_CPU_LINEAR"  # =torch: PyTorch's own linear layers on a CPU too


def switches(device: torch.device) -> bool:
    """Whether ``onednn_linears`` switches layers on ``device``: a CPU, PyTorch built with oneDNN, and not
    ``TRUTHSTEER_CPU_LINEAR=torch``."""
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and os.environ.get(OPT_OUT, "") != "torch"


def onednn_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` by oneDNN (fp32 on a CPU, no gradients)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def check_product(name: str, module: nn.Linear, x: torch.Tensor, out: torch.Tensor) -> None:
    """Fail when a product's first row differs from PyTorch's own by more than float32 rounding can: each output
    may differ by ``in_features`` roundings of its terms' magnitudes in either sum, so by at most
    ``2 * in_features * eps * (|x| . |W_j| + |b_j|)``; the bound used is that with ``|x| . |W_j|`` raised to
    ``||x|| ||W_j||`` (Cauchy-Schwarz: about 1.5x it for dense rows), which needs no copy of ``|W|`` (making one
    for every layer took 0.2-0.3 s of a 13 s smoke generation, profiled). Where PyTorch's output is
    not finite (an overflowed input, say: the run's own checks report that), oneDNN's must not be finite either."""
    row = x.reshape(-1, x.shape[-1])[:1]  # (1, in)
    want = F.linear(row, module.weight, module.bias)  # (1, out)
    scale = torch.linalg.vector_norm(row) * torch.linalg.vector_norm(module.weight, dim=1)  # (out,)
    if module.bias is not None:
        scale = scale + module.bias.abs()  # (out,)
    bound = 2 * module.in_features * torch.finfo(torch.float32).eps * scale[None]  # (1, out)
    got = out.reshape(-1, out.shape[-1])[:1]  # (1, out)
    diff = (got - want).abs()  # (1, out)
    agree = torch.where(torch.isfinite(want), diff <= bound, ~torch.isfinite(got))  # (1, out)
    if not bool(agree.all()):
        worst = int((~agree[0]).nonzero()[0, 0])
        raise RuntimeError(f"{name}: oneDNN's product differs from PyTorch's at output {worst}: "
                           f"{float(got[0, worst]):.6g} against {float(want[0, worst]):.6g} (float32 rounding "
                           f"allows {float(bound[0, worst]):.3g}); run with {OPT_OUT}=torch to use PyTorch's own")


def available_bytes() -> int | None:
    """The memory the system can give without swapping (``MemAvailable`` of ``/proc/meminfo``), None where it
    cannot be read (not Linux)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _version(weight: torch.Tensor) -> int:
    """How often ``weight`` was changed in place (-1 for an inference tensor, which keeps no count: one made
    under ``torch.inference_mode``, not a loaded model's)."""
    return -1 if weight.is_inference() else weight._version


class _OneDNN:
    """A linear layer's forward by oneDNN, its first product in the block checked (``check_product``); on its
    weight laid out for oneDNN while ``laid_out`` holds one (its first product on it checked too)."""

    def __init__(self, name: str, module: nn.Linear) -> None:
        self.name, self.module, self.checked = name, module, False
        self.laid_out: torch.Tensor | None = None  # the weight in oneDNN's own layout (an opaque mkldnn tensor)
        self.rows = 0  # what it was laid out for, and from (the weight and its version):
        self.source: tuple[torch.Tensor | None, int] = (None, -1)

    def lay_out(self, rows: int | None) -> None:
        """Hold the weight laid out for products of about ``rows`` rows (None: drop the laid-out copy)."""
        weight = self.module.weight
        self.laid_out = None if rows is None else torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
        self.rows, self.source, self.checked = rows or 0, (weight, _version(weight)), False

    def current(self) -> torch.Tensor:
        """The weight to multiply by: the laid-out copy while it is that of the weight as it is now (a weight
        changed in place or replaced since is laid out again), else the weight itself."""
        if self.laid_out is None:
            return self.module.weight
        weight = self.module.weight
        if self.source[0] is not weight or self.source[1] != _version(weight):
            self.lay_out(self.rows)
        return self.laid_out  # type: ignore[return-value]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        module = self.module
        if torch.is_grad_enabled() or x.dtype != torch.float32 or x.device.type != "cpu" or not x.numel():
            return F.linear(x, module.weight, module.bias)
        out = onednn_product(x, self.current(), module.bias)
        if not self.checked:
            check_product(self.name, module, x, out)
            self.checked = True
            if self.laid_out is not None:  # the weight is not read while its laid-out copy is current
                unmap_file_pages(module.weight)
        return out


def switchable(module: nn.Module) -> bool:
    """A plain ``nn.Linear`` (not a subclass: quantised or wrapped layers keep their own forward) with an fp32
    weight (and bias) on a CPU, and no forward of its own set on the instance (accelerate's hooks set one)."""
    return (type(module) is nn.Linear and module.weight.dtype == torch.float32 and module.weight.device.type == "cpu"
            and (module.bias is None or module.bias.dtype == torch.float32) and "forward" not in vars(module))


@contextlib.contextmanager
def onednn_linears(model: nn.Module, device: torch.device, laid_out_rows: int | None = None) -> Iterator[int]:
    """Run ``model``'s fp32 linear layers (the ``switchable`` ones, where ``switches(device)``) by oneDNN; on
    exit, and on an error, every layer gets its own forward back. Nested blocks leave the layers to the
    outermost one, but a nested block's ``laid_out_rows`` lays their weights out until it exits.

    Args:
        model: the model; every switchable ``nn.Linear`` in it is switched.
        device: where the model runs; elsewhere than on a CPU nothing changes.
        laid_out_rows: also hold each weight laid out for oneDNN's products of about this many rows (a copy
            of every linear weight, dropped on exit), as decoding a batch of that many rows wants it; not where
            the copy would take over half the memory the system has available (``available_bytes``).

    Yields:
        how many layers this block switched (0 in a nested block).
    """
    switched: list[nn.Module] = []
    laid: list[_OneDNN] = []
    try:
        if switches(device):
            for name, module in model.named_modules():
                if switchable(module):
                    module.forward = _OneDNN(name, module)  # type: ignore[arg-type]
                    switched.append(module)
            if laid_out_rows is not None:
                waiting = [forward for module in model.modules()
                           if isinstance(forward := vars(module).get("forward"), _OneDNN) and forward.laid_out is None]
                copy_bytes = sum(f.module.weight.nbytes for f in waiting)
                available = available_bytes()
                if available is not None and copy_bytes > available // 2:
                    print(f"linear weights not laid out for oneDNN: the copy ({copy_bytes / 2**30:.1f} GiB) would take "
                          f"over half the memory available ({available / 2**30:.1f} GiB); multiplying them as they are")
                    waiting = []
                for forward in waiting:
                    forward.lay_out(laid_out_rows)
                    laid.append(forward)
        yield len(switched)
    finally:
        for forward in laid:
            forward.lay_out(None)
        for module in switched:
            del module.forward


__all__ = ['OPT_OUT', 'available_bytes', 'check_product', 'onednn_linears', 'onednn_product', 'switchable', 'switches']
