"""``evaluation.linear``: linear layers by oneDNN against the products written out in float64, what falls back to
``torch.nn.functional.linear``, the run-time check of each layer's first product, and the switch's restore.

The end-to-end oracle (tiny models generating and scoring with oneDNN's linear layers against a recompute and
a plain forward on PyTorch's own) is ``test_oracles.test_onednn_linear_layers_answer_and_score_as_torchs_own_do``.
Marked ``oracle``: ``torch.ops.mkldnn`` is a private PyTorch interface, which CI checks again on the newest
versions ``pyproject.toml`` allows.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from evaluation import linear
from evaluation.linear import OPT_OUT, onednn_linears, switchable, switches

pytestmark = pytest.mark.oracle

CPU = torch.device("cpu")


class Layers(nn.Module):
    """Linear layers of the shapes a decoder has (narrow and wide, with and without a bias) and one that is not
    a plain ``nn.Linear``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(24, 40, bias=False)
        self.down = nn.Linear(40, 24, bias=True)
        self.head = nn.Linear(24, 97, bias=False)
        self.other = Subclassed(24, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(torch.relu(self.up(x)))) + self.other(x).sum(-1, keepdim=True)


class Subclassed(nn.Linear):
    """A layer with a forward of its own (a quantised layer, say): never switched."""


def in_float64(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """The layer's product one output at a time in float64."""
    weight = layer.weight.detach().double()  # (out, in)
    out = torch.stack([(x.double() * weight[o]).sum(-1) for o in range(weight.shape[0])], dim=-1)  # (..., out)
    return out if layer.bias is None else out + layer.bias.detach().double()


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The rows of every product oneDNN runs."""
    rows: list[int] = []
    real = linear.onednn_product

    def counting(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        rows.append(x.shape[:-1].numel())
        return real(x, weight, bias)

    monkeypatch.setattr(linear, "onednn_product", counting)
    return rows


@pytest.mark.parametrize("shape", [(1, 24), (7, 24), (80, 24), (3, 5, 24)])
def test_switched_layers_multiply_as_float64_does(shape: tuple[int, ...], counted: list[int]) -> None:
    model = Layers()
    x = torch.randn(*shape)
    hidden = torch.randn(*shape[:-1], 40)
    with torch.inference_mode(), onednn_linears(model, CPU) as switched:
        assert switched == 3  # up, down, head; not the subclass
        for layer, inputs in ((model.up, x), (model.head, x), (model.down, hidden)):
            got = layer(inputs)
            assert got.shape == (*shape[:-1], layer.out_features)
            assert torch.allclose(got.double(), in_float64(inputs, layer), rtol=1e-5, atol=1e-5)
    assert counted == [x[..., 0].numel()] * 3  # not vacuous: oneDNN ran each product
    assert all("forward" not in vars(m) for m in model.modules())


def test_what_oneDNN_cannot_run_falls_back_to_torch(counted: list[int]) -> None:
    model = Layers()
    x = torch.randn(4, 24, requires_grad=True)
    with onednn_linears(model, CPU):
        out = model.up(x)  # gradients on: torch's linear, bit for bit, and it backpropagates
        assert torch.equal(out, F.linear(x, model.up.weight))
        out.sum().backward()
        assert x.grad is not None and torch.allclose(x.grad, model.up.weight.detach().sum(0).expand(4, 24), atol=1e-6)
        with torch.inference_mode():
            assert model.up(x.detach()[:0]).shape == (0, 40)  # empty
    assert counted == []


def test_a_weight_changed_in_place_is_read_as_it_is_now() -> None:
    model = Layers()
    x = torch.randn(5, 24)
    with torch.inference_mode(), onednn_linears(model, CPU):
        before = model.head(x)
        with torch.no_grad():
            model.head.weight.mul_(2)
        after = model.head(x)
    assert torch.allclose(after, 2 * before, rtol=1e-5, atol=1e-6)
    assert torch.allclose(after.double(), in_float64(x, model.head), rtol=1e-5, atol=1e-5)


def test_the_switch_is_undone_on_exit_and_on_an_error_and_nests() -> None:
    model = Layers()
    x = torch.randn(6, 24)
    with torch.inference_mode():
        plain = model(x)
        with pytest.raises(RuntimeError, match="inside"), onednn_linears(model, CPU):
            with onednn_linears(model, CPU) as inner:
                assert inner == 0  # already switched: the outer block owns them
            assert "forward" in vars(model.up)
            raise RuntimeError("an error inside")
        assert all("forward" not in vars(m) for m in model.modules())
        assert torch.equal(model(x), plain)  # torch's own linear layers again, bit for bit


def test_only_plain_fp32_linear_layers_on_a_cpu_are_switched() -> None:
    assert switches(CPU) == torch.backends.mkldnn.is_available()
    assert not switches(torch.device("cuda")) and not switches(torch.device("meta"))
    assert not switchable(Subclassed(4, 4)) and not switchable(nn.Linear(4, 4).to(torch.bfloat16))
    assert not switchable(nn.Embedding(4, 4)) and switchable(nn.Linear(4, 4))
    model = Layers()
    with onednn_linears(model, torch.device("cuda")) as switched:
        assert switched == 0 and "forward" not in vars(model.up)


def test_the_opt_out_keeps_torchs_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OPT_OUT, "torch")
    model = Layers()
    with onednn_linears(model, CPU) as switched:
        assert switched == 0 and not switches(CPU)


def test_a_product_beyond_float32_rounding_fails_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The run-time check: each layer's first product in a block is set against torch's on one row."""
    model = Layers()
    real = linear.onednn_product

    def off_by_a_little(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        out = real(x, weight, bias)
        return out + 1e-3 * out.abs().max()

    monkeypatch.setattr(linear, "onednn_product", off_by_a_little)
    with (torch.inference_mode(), onednn_linears(model, CPU),
          pytest.raises(RuntimeError, match=r"head: oneDNN.*against.*TRUTHSTEER_CPU_LINEAR=torch")):
        model.head(torch.randn(4, 24))


def test_a_product_that_is_not_finite_where_torchs_is_not_either_passes_the_check() -> None:
    """An overflowed input (a steering scale of 1e39, say) gives inf/NaN both ways: that is for the run's own
    non-finite checks to report, not a disagreement between the libraries."""
    model = Layers()
    x = torch.randn(3, 24)
    x[0, 5] = float("inf")
    with torch.inference_mode(), onednn_linears(model, CPU):
        got = model.up(x)
    want = F.linear(x, model.up.weight)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want)) and not bool(torch.isfinite(got[0]).all())
    assert torch.allclose(got[1:], want[1:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 8, 80])
def test_weights_laid_out_for_onednn_multiply_as_float64_does_until_the_block_exits(rows: int) -> None:
    """A nested block with ``laid_out_rows`` (what generation asks for) multiplies by a copy of each weight in
    oneDNN's own layout, whatever the batch, and drops the copies when it exits; the outer block keeps its layers."""
    model = Layers()
    x, hidden = torch.randn(rows, 24), torch.randn(rows, 40)
    factors: list[torch.Tensor] = []
    real = linear.onednn_product

    def recording(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        factors.append(weight)
        return real(x, weight, bias)

    with pytest.MonkeyPatch.context() as patch, torch.inference_mode(), onednn_linears(model, CPU):
        patch.setattr(linear, "onednn_product", recording)
        with onednn_linears(model, CPU, laid_out_rows=80) as inner:
            assert inner == 0
            for layer, inputs in ((model.up, x), (model.head, x), (model.down, hidden), (model.up, x[:3])):
                assert torch.allclose(layer(inputs).double(), in_float64(inputs, layer), rtol=1e-5, atol=1e-5)
        assert len(factors) == 4 and all(f.is_mkldnn for f in factors)  # not vacuous: the laid-out copies ran
        assert all(vars(m)["forward"].laid_out is None for m in (model.up, model.down, model.head))  # dropped
        model.up(x)
        assert not factors[-1].is_mkldnn  # the outer block's layers multiply the weights as they are again
    assert all("forward" not in vars(m) for m in model.modules())


def test_a_laid_out_weight_changed_in_place_or_replaced_is_laid_out_again() -> None:
    model = Layers()
    x, zeros = torch.randn(5, 24), nn.Parameter(torch.zeros(97, 24), requires_grad=False)
    with torch.inference_mode(), onednn_linears(model, CPU, laid_out_rows=5):
        before = model.head(x)
        with torch.no_grad():
            model.head.weight.mul_(2)
        assert torch.allclose(model.head(x), 2 * before, rtol=1e-5, atol=1e-6)
        model.head.weight = zeros
        assert torch.equal(model.head(x), torch.zeros(5, 97))


def test_a_laid_out_product_beyond_float32_rounding_fails_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first product on a laid-out copy is checked against PyTorch's on the weight itself."""
    model = Layers()
    real = linear.onednn_product
    monkeypatch.setattr(linear, "onednn_product",
                        lambda x, w, b: real(x, w, b) + (1e-2 if getattr(w, "is_mkldnn", False) else 0.0))
    with torch.inference_mode(), onednn_linears(model, CPU):
        model.up(torch.randn(3, 24))  # checked on the weight as it is: passes
        with pytest.raises(RuntimeError, match="up: oneDNN's product differs"), onednn_linears(model, CPU, 3):
            model.up(torch.randn(3, 24))


def test_weights_are_not_laid_out_where_the_copy_would_take_over_half_the_available_memory(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    model = Layers()
    weights = sum(m.weight.nbytes for m in (model.up, model.down, model.head))
    assert linear.available_bytes() is None or linear.available_bytes() > 2 * weights  # this machine's: laid out
    monkeypatch.setattr(linear, "available_bytes", lambda: 2 * weights - 1)
    x = torch.randn(4, 24)
    with torch.inference_mode(), onednn_linears(model, CPU, laid_out_rows=4):
        assert all(vars(m)["forward"].laid_out is None for m in (model.up, model.down, model.head))
        assert torch.allclose(model.head(x).double(), in_float64(x, model.head), rtol=1e-5, atol=1e-5)
    assert "not laid out for oneDNN" in capsys.readouterr().out
    monkeypatch.setattr(linear, "available_bytes", lambda: 2 * weights)
    with torch.inference_mode(), onednn_linears(model, CPU, laid_out_rows=4):
        assert all(vars(m)["forward"].laid_out is not None for m in (model.up, model.down, model.head))


def file_resident_bytes(path: str) -> int:
    """The resident bytes of this process's mappings of ``path`` (``/proc/self/smaps``)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if not line[0].isupper():  # a mapping's header: address range, perms, ..., path
                inside = line.rstrip().endswith(path)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/pagemap"), reason="Linux's /proc/self/pagemap")
def test_laid_out_weights_leave_their_file_pages_and_read_back_the_same(tmp_path: Path) -> None:
    """A model loaded from safetensors as the loader loads one (``from_pretrained`` maps the file): while its
    weights are laid out for oneDNN, the linear weights' pages of the file leave resident memory (``smaps``),
    except those of a weight written in place (a private copy, which ``MADV_DONTNEED`` would lose); logits before,
    inside and after the block agree, and the written weight keeps its write."""
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval().requires_grad_(False)
    path = str(tmp_path / "model.safetensors")
    ids = torch.randint(0, 512, (3, 7), generator=torch.Generator().manual_seed(1))  # (batch, seq)
    written = model.model.layers[1].mlp.up_proj.weight  # (512, 256): 128 pages
    with torch.inference_mode():
        written[100, 5] += 1.0  # copy-on-write: that page is the process's own now
        want = float(written[100, 5])
        before = model(ids).logits  # (batch, seq, vocab)
        touched = file_resident_bytes(path)
        assert touched >= sum(p.nbytes for p in model.parameters()) * 0.9
        with onednn_linears(model, CPU, laid_out_rows=3):
            inside = model(ids).logits
            left = file_resident_bytes(path)
        after = model(ids).logits
    linears = sum(m.weight.nbytes for m in model.modules() if isinstance(m, nn.Linear))
    assert touched - left >= (linears - written.nbytes) * 0.95  # every linear weight but the written one
    assert left >= written.nbytes  # whose pages stayed
    assert float(written[100, 5]) == want
    torch.testing.assert_close(inside, before, rtol=1e-5, atol=1e-5)
    assert torch.equal(after, before)
    assert linear.unmap_file_pages(torch.randn(4096)) == 0  # anonymous memory: never
