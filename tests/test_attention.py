"""``evaluation.attention``: the packed decode attention against softmax attention written out here in float64,
what it passes on to ``transformers``' sdpa, and the switch that ``decode_attention`` makes on a CPU.

The end-to-end oracle (tiny models on sdpa attention decoding through it, against a recompute without a
cache on transformers' own attention) is ``test_oracles.test_packed_decode_attention_answers_as_the_recompute_does``.
Marked ``oracle``: the attention function is called the way ``transformers`` calls it, a contract that CI
checks again on the newest versions ``pyproject.toml`` allows.
"""

from __future__ import annotations

import copy
import math
import weakref

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from evaluation import native
from evaluation.attention import PACKED_DECODE, decode_attention, packed_decode_attention
from tests.tiny_models import make_tiny

pytestmark = pytest.mark.oracle

BATCH, HEAD_DIM, KV_LEN = 4, 8, 11


class Grouped(torch.nn.Module):
    """What sdpa reads from an attention module: how many query heads share a key/value head."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups


def written_out(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                scale: float) -> torch.Tensor:
    """Softmax attention one row, head and column at a time in float64: head h reads key/value head
    h // (heads // kv_heads); a row attends the columns its mask marks."""
    batch, heads, _, head_dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    out = torch.zeros(batch, 1, heads, head_dim, dtype=torch.float64)  # (batch, 1, heads, head_dim)
    for b in range(batch):
        cols = [c for c in range(kv_len) if mask is None or bool(mask[b, 0, 0, c])]
        for h in range(heads):
            kv = h // (heads // kv_heads)
            scores = [scale * sum(float(query[b, h, 0, d]) * float(key[b, kv, c, d]) for d in range(head_dim))
                      for c in cols]
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            for w, c in zip(weights, cols, strict=True):
                out[b, 0, h] += w / sum(weights) * value[b, kv, c].double()
    return out


def qkv(seed: int, heads: int = 6, kv_heads: int = 2, head_dim: int = HEAD_DIM) -> tuple[torch.Tensor, ...]:
    """A random one-token query ``(BATCH, heads, 1, head_dim)`` and a static cache's key and value
    ``(BATCH, kv_heads, KV_LEN, head_dim)``."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(BATCH, heads, 1, head_dim, generator=g),
            torch.randn(BATCH, kv_heads, KV_LEN, head_dim, generator=g),
            torch.randn(BATCH, kv_heads, KV_LEN, head_dim, generator=g))


def left_padded_mask(filled: int) -> torch.Tensor:
    """``(BATCH, 1, 1, KV_LEN)``: row b starts at column b (left padding), the columns from ``filled`` on are a
    static cache's unfilled end, and row 1 also skips column 6 (a sliding window's hole, say)."""
    mask = torch.zeros(BATCH, 1, 1, KV_LEN, dtype=torch.bool)  # (batch, 1, 1, kv_len)
    for b in range(BATCH):
        mask[b, 0, 0, b + 1:filled] = True
    mask[1, 0, 0, 6] = False
    return mask


@pytest.fixture(params=["cpp", "torch"])
def products(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The packed attention's two products by ``evaluation.native``'s C++ ones (built on this machine: a test
    fails where they cannot be) or by PyTorch's ``bmm`` (``TRUTHSTEER_CPU_ATTENTION=torch``)."""
    if request.param == "torch":
        monkeypatch.setenv(native.OPT_OUT, "torch")
        assert native.kernels() is None
    else:
        monkeypatch.delenv(native.OPT_OUT, raising=False)
        assert native.kernels() is not None, "the C++ products did not build here (see the line above)"
    return str(request.param)


@pytest.mark.parametrize(("heads", "kv_heads"), [(6, 2), (6, 6), (6, 1)])
@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("head_dim", [HEAD_DIM, 12])
def test_packed_decode_attention_equals_softmax_attention_written_out(heads: int, kv_heads: int, masked: bool,
                                                                     head_dim: int, products: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Through either product (the C++ ones counted: not vacuous), on a static cache's columns (rows left-padded,
    the first attended column 1, the end unfilled: strided slices of the cache); the C++ scores eight columns at
    a time (a head dimension of 8: with AVX2) and one at a time (12)."""
    calls: list[str] = []
    if products == "cpp":
        real = native.kernels()

        class Counted:
            def scores(self, *args: object) -> torch.Tensor:
                calls.append("scores")
                return real.scores(*args)

            def weighted(self, *args: object) -> torch.Tensor:
                calls.append("weighted")
                return real.weighted(*args)

        monkeypatch.setattr(native, "kernels", Counted)
    query, key, value = qkv(heads + kv_heads, heads, kv_heads, head_dim)
    mask = left_padded_mask(filled=8) if masked else None
    got, weights = packed_decode_attention(Grouped(heads // kv_heads), query, key, value, mask, scaling=0.3)
    assert weights is None and got.shape == (BATCH, 1, heads, head_dim)
    assert torch.allclose(got.double(), written_out(query, key, value, mask, 0.3), atol=1e-6)
    # the same as transformers' sdpa attention on the same call, to float32 rounding
    expected, _ = sdpa_attention_forward(Grouped(heads // kv_heads), query, key, value, mask, scaling=0.3)
    assert torch.allclose(got, expected, atol=1e-6)
    # the columns after the mask's last are never read: garbage there changes nothing
    if masked:
        key[:, :, 8:] = value[:, :, 8:] = float("nan")
        assert torch.equal(packed_decode_attention(Grouped(heads // kv_heads), query, key, value, mask, scaling=0.3)[0],
                           got)
    assert calls == ([] if products == "torch" else ["scores", "weighted"] * (2 if masked else 1))


@pytest.mark.parametrize("head_dim", [8, 12, 64])
def test_a_rows_cpp_scores_do_not_depend_on_the_batch_or_the_span(head_dim: int) -> None:
    """fp32 batched answers equal one-at-a-time answers only if a row's scores are the same bits in any batch:
    each column's score, computed with the batch's other rows and a span starting at column 0, equals the row's
    alone over its own columns, at every offset within a block of eight (19 columns: two blocks and a tail)."""
    kernels = native.kernels()
    assert kernels is not None, "the C++ products did not build here"
    g = torch.Generator().manual_seed(head_dim)
    key = torch.randn(5, 2, 24, head_dim, generator=g)  # (batch, kv_heads, kv_len, head_dim): a static cache
    packed = torch.randn(5, 2, 3, head_dim, generator=g)  # (batch, kv_heads, groups, head_dim)
    together = kernels.scores(packed, key, 0, 19)  # (5, 2, 3, 19)
    assert torch.allclose(together.double(), packed.double() @ key[:, :, :19].double().transpose(-1, -2), atol=1e-5)
    for row in range(5):
        for lo in (0, 1, 5, 11):
            alone = kernels.scores(packed[row:row + 1].contiguous(), key[row:row + 1], lo, 19)  # (1, 2, 3, 19 - lo)
            assert torch.equal(alone[0], together[row, :, :, lo:])


def test_cpp_products_beyond_float32_rounding_fail_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode block's first call through the C++ products is checked against PyTorch's on the same call."""
    monkeypatch.delenv(native.OPT_OUT, raising=False)
    real = native.kernels()
    assert real is not None

    class Off:
        scores = staticmethod(real.scores)

        @staticmethod
        def weighted(probs: torch.Tensor, value: torch.Tensor, lo: int) -> torch.Tensor:
            return real.weighted(probs, value, lo) * (1 + 1e-4)

    query, key, value = qkv(3)
    model, _ = make_tiny("llama")
    model.set_attn_implementation("sdpa")
    with decode_attention(model, torch.device("cpu")):
        packed_decode_attention(Grouped(3), query, key, value, left_padded_mask(filled=8))  # checked: passes
    monkeypatch.setattr(native, "kernels", Off)
    with (pytest.raises(RuntimeError, match=f"output differ from PyTorch's .*{native.OPT_OUT}=torch"),
          decode_attention(model, torch.device("cpu"))):
        packed_decode_attention(Grouped(3), query, key, value, left_padded_mask(filled=8))


def test_where_the_cpp_products_cannot_be_built_a_line_says_so_and_pytorchs_run(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from torch.utils import cpp_extension

    def no_compiler(**kwargs: object) -> None:
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.delenv(native.OPT_OUT, raising=False)
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    native._built.cache_clear()
    try:
        assert native.kernels() is None and native.kernels() is None
        assert capsys.readouterr().out.count("not built (Error building extension: c++: command not found)") == 1
        query, key, value = qkv(4)
        mask = left_padded_mask(filled=8)
        got = packed_decode_attention(Grouped(3), query, key, value, mask, scaling=0.3)[0]
        assert torch.allclose(got.double(), written_out(query, key, value, mask, 0.3), atol=1e-6)
    finally:
        native._built.cache_clear()


def test_what_the_packed_path_does_not_cover_goes_to_sdpa_unchanged() -> None:
    g = torch.Generator().manual_seed(1)
    key = torch.randn(BATCH, 2, KV_LEN, HEAD_DIM, generator=g)  # (batch, kv_heads, kv_len, head_dim)
    value = torch.randn(BATCH, 2, KV_LEN, HEAD_DIM, generator=g)  # (batch, kv_heads, kv_len, head_dim)
    module = Grouped(3)
    # several query tokens a row (a prefill): sdpa's own result, bit for bit
    several = torch.randn(BATCH, 6, 3, HEAD_DIM, generator=g)  # (batch, heads, 3, head_dim)
    causal = torch.ones(BATCH, 1, 3, KV_LEN, dtype=torch.bool).tril(KV_LEN - 3)  # (batch, 1, 3, kv_len)
    assert torch.equal(packed_decode_attention(module, several, key, value, causal)[0],
                       sdpa_attention_forward(module, several, key, value, causal)[0])
    # a row that attends nothing: sdpa's safe softmax gives it zeros, not NaN
    one = torch.randn(BATCH, 6, 1, HEAD_DIM, generator=g)  # (batch, heads, 1, head_dim)
    empty_row = left_padded_mask(filled=8)
    empty_row[2] = False
    got = packed_decode_attention(module, one, key, value, empty_row)[0]
    assert torch.equal(got, sdpa_attention_forward(module, one, key, value, empty_row)[0])
    assert not got.isnan().any() and bool((got[2] == 0).all())
    # a float (additive) mask
    additive = torch.zeros(BATCH, 1, 1, KV_LEN).masked_fill(~left_padded_mask(filled=8), float("-inf"))
    assert torch.equal(packed_decode_attention(module, one, key, value, additive)[0],
                       sdpa_attention_forward(module, one, key, value, additive)[0])


def test_decode_attention_switches_an_sdpa_model_on_a_cpu_and_back() -> None:
    model, _ = make_tiny("llama")
    model.set_attn_implementation("sdpa")
    with decode_attention(model, torch.device("cpu")):
        assert model.config._attn_implementation == PACKED_DECODE
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(KeyError), decode_attention(model, torch.device("cpu")):
        raise KeyError("a failure while decoding")
    assert model.config._attn_implementation == "sdpa"  # switched back on an error too
    with decode_attention(model, torch.device("cuda")):  # a GPU keeps its own kernels (only the type is read)
        assert model.config._attn_implementation == "sdpa"
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")  # e.g. Gemma-2, whose soft-capped scores need eager attention
    with decode_attention(eager, torch.device("cpu")):
        assert eager.config._attn_implementation == "eager"


def test_a_masks_span_is_read_once_per_mask_object_and_each_new_mask_afresh() -> None:
    """Every layer of a forward gets the same mask object, so its attended columns are worked out once; the next
    forward's mask (in a static cache: the same shape, one more column filled) must be read again, and the mask
    held for that is let go when ``decode_attention`` exits."""
    module = Grouped(3)
    query, key, value = qkv(2)
    model, _ = make_tiny("llama")
    model.set_attn_implementation("sdpa")
    with decode_attention(model, torch.device("cpu")):
        for filled in (8, 9, 10):  # three steps, each a new mask of the same shape
            mask = left_padded_mask(filled)
            got = packed_decode_attention(module, query, key, value, mask, scaling=0.3)[0]
            assert torch.allclose(got.double(), written_out(query, key, value, mask, 0.3), atol=1e-6), filled
            # the next layer of the same forward: the same mask object, the same result
            assert torch.equal(packed_decode_attention(module, query, key, value, mask, scaling=0.3)[0], got)
        held = weakref.ref(mask)
        del mask
        assert held() is not None  # kept while decoding: its id cannot be reused by another mask
    assert held() is None
