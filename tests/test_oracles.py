"""Steering from the prompt's end, checked against oracles that share none of the product's machinery.

The oracle hook below is written here, not imported: it adds the steering delta to the output of
decoder layer L (found with transformers' own ``get_decoder().layers``) at positions
``>= start`` of a forward *without* a KV cache, where a token's position is simply its index. So
it needs neither the cache offset nor ``steering.hooks``. Against it:

- generation: ``generate_batch`` (KV cache, batched, left-padded, as ``evaluate`` runs it) equals
  a greedy loop that recomputes the whole sequence every step with the oracle hook on, for a CAA
  vector and an MLP module, from the prompt's end and everywhere;
- scoring: ``answer_logprobs`` (the prompt's keys/values cached once, answers run against them)
  equals one plain forward per answer under the oracle hook;
- not vacuous: the product's answers differ from steering the prompt only (the bug of issue #11,
  where every generated token looked like position 0) and from the unsteered model;
- the run-time guard: with the cache hidden from the hook (as a transformers rename would),
  generation, MC scoring and an evaluate variant fail with ``SteeringNotApplied`` and a message
  that says why, instead of reporting the unsteered model's numbers.

Tiny Llama/Gemma-2/Gemma-3/Gemma-3-multimodal models, and (slow) ``smollm2-135m``. Marked
``oracle``: CI runs them again on the newest versions ``pyproject.toml`` allows.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import mlflow
import pytest
import torch
from torch import Tensor, nn
from transformers import AttentionInterface, DynamicCache

from core.config import EvalConfig
from core.config_io import load_config
from core.data import Question, question_id
from core.models import LoadedModel, load_model
from core.tracking import stage_run
from evaluation import decode, linear, mc, native
from evaluation import generate as generation
from evaluation.attention import PACKED_DECODE, decode_attention, packed_decode_attention
from evaluation.decode import greedy_decode
from evaluation.generate import (
    decode_answer,
    generate_batch,
    generate_missing,
    generate_missing_variants,
    generate_together,
    generation_order,
    stop_token_ids,
)
from evaluation.generation_store import GenerationStore
from evaluation.judges import JudgeItem
from evaluation.mc import MCJudge, answer_logprobs, mc_choices
from stages import evaluate
from steering import hooks
from steering.hooks import SteeringNotApplied, active_hooks
from steering.layers import decoder_layers
from steering.methods.intervention import Steering
from steering.prompts import answer_text, encode_prompts, encode_text, format_prompt
from tests.test_generate import QUESTIONS, mlp_module, tiny_loaded
from tests.tiny_models import TINY_ARCHS

pytestmark = pytest.mark.oracle

LAYER = 1
MAX_NEW = 10
Delta = Callable[[Tensor], Tensor]  # (batch, seq, d_model) hidden -> delta of the same shape


@contextmanager
def oracle_hook(model: nn.Module, layer: int, delta: Delta, starts: Tensor, stop: int | None = None) -> Iterator[None]:
    """Add ``delta(h)`` to decoder layer ``layer``'s output at positions >= ``starts[row]`` (and < ``stop``);
    valid only for forwards without a KV cache, where position t of the input is absolute position t."""
    block = model.get_decoder().layers[layer]  # type: ignore[operator]

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output  # (batch, seq, d_model)
        positions = torch.arange(hidden.shape[1])  # (seq,)
        here = (positions[None, :] >= starts[:, None]) & (positions < (stop if stop is not None else len(positions)))
        edited = torch.where(here[..., None], hidden + delta(hidden), hidden)  # (batch, seq, d_model)
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def delta_of(steering: Steering) -> Delta:
    if steering.vector is not None:
        vector = steering.vector
        return lambda h: (steering.scale * vector).to(h.dtype)  # (d_model,) broadcast
    module = steering.module
    assert module is not None
    return lambda h: (steering.scale * module(h.float())).to(h.dtype)  # (batch, seq, d_model)


@torch.no_grad()
def recompute_greedy(loaded: LoadedModel, questions: Sequence[str], delta: Delta, layer: int, steer_from: str,
                     max_new: int) -> list[str]:
    """Greedy answers without a KV cache: every step runs the whole left-padded sequence, with the
    position ids ``generate`` gives left-padded rows, and the oracle hook from ``steer_from``:
    ``prompt_end`` (the last prompt token and every generated one), ``all``, or ``prompt_only``
    (the last prompt token only: what a lost cache offset did)."""
    tokenizer, model, fmt = loaded.tokenizer, loaded.model, loaded.prompt_format
    enc = encode_prompts(tokenizer, [format_prompt(q, tokenizer, fmt) for q in questions])
    ids, mask = enc["input_ids"], enc["attention_mask"]  # (batch, width)
    batch, width = ids.shape
    stops = torch.tensor(stop_token_ids(tokenizer, model))
    starts = torch.full((batch,), 0 if steer_from == "all" else width - 1)  # (batch,)
    finished = torch.zeros(batch, dtype=torch.bool)
    new: list[Tensor] = []
    for _ in range(max_new):
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (batch, seq)
        with oracle_hook(model, layer, delta, starts, stop=width if steer_from == "prompt_only" else None):
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False).logits
        token = logits[:, -1].argmax(dim=-1)  # (batch,)
        token = torch.where(finished, torch.full_like(token, tokenizer.pad_token_id), token)
        new.append(token)
        finished |= torch.isin(token, stops)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
        if bool(finished.all()):
            break
    rows_new = torch.stack(new, dim=1).tolist()  # (batch, new)
    return [decode_answer(tokenizer, row, stops.tolist(), fmt).text for row in rows_new]


@torch.no_grad()
def plain_logprob(loaded: LoadedModel, question: str, answer: str, delta: Delta | None, all_positions: bool = False,
                  layer: int = LAYER) -> float:
    """One forward of prompt + answer without a cache, the oracle hook from the last prompt token on
    (or everywhere); the sum of the answer tokens' log-probs."""
    tokenizer, fmt = loaded.tokenizer, loaded.prompt_format
    prompt_ids = encode_text(tokenizer, format_prompt(question, tokenizer, fmt))
    answer_ids = tokenizer(answer_text(answer, fmt), add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids])  # (1, seq)
    start = torch.tensor([0 if all_positions else len(prompt_ids) - 1])  # (1,)
    hook = oracle_hook(loaded.model, layer, delta, start) if delta is not None else nullcontext()
    with hook:
        logp = loaded.model(input_ids=ids).logits[0].double().log_softmax(dim=-1)  # (seq, vocab)
    return float(sum(logp[len(prompt_ids) - 1 + i, t] for i, t in enumerate(answer_ids)))


def tiny_steerings(loaded: LoadedModel, layer: int = LAYER) -> dict[str, Steering]:
    vector = torch.randn(loaded.model.config.get_text_config().hidden_size,
                         generator=torch.Generator().manual_seed(11))  # (d_model,)
    vector = vector / vector.norm() * 6.0
    return {
        "caa": Steering("caa", layer=layer, scale=1.0, vector=vector, source_run="r"),
        "caa_all": Steering("caa", layer=layer, scale=1.0, vector=vector, positions="all", source_run="r"),
        "mlp": Steering("mlp_gen", layer=layer, module=mlp_module(loaded), source_run="m"),
    }


# ---------------------------------------------------------------- generation


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("kind", ["caa", "caa_all", "mlp"])
def test_cached_batched_generation_equals_a_recompute_with_an_independent_hook(arch: str, kind: str) -> None:
    loaded = tiny_loaded(arch)
    steering = tiny_steerings(loaded)[kind]
    decoding = EvalConfig(max_new_tokens=MAX_NEW, batch_size=len(QUESTIONS))
    answers = generate_batch(loaded, QUESTIONS, steering, decoding)  # one left-padded batch, as evaluate runs it
    expected = recompute_greedy(loaded, QUESTIONS, delta_of(steering), LAYER,
                                "all" if steering.positions == "all" else "prompt_end", MAX_NEW)
    assert [a.text for a in answers] == expected
    assert all(a.steered_tokens == min(MAX_NEW, a.n_new_tokens + (not a.truncated)) > 0 for a in answers)
    if steering.positions == "from_prompt_end":  # not vacuous: steering the prompt only answers otherwise
        prompt_only = recompute_greedy(loaded, QUESTIONS, delta_of(steering), LAYER, "prompt_only", MAX_NEW)
        assert prompt_only != expected
    baseline = generate_batch(loaded, QUESTIONS, Steering.baseline(), decoding)
    assert [a.text for a in baseline] != expected and all(a.steered_tokens == 0 for a in baseline)
    assert active_hooks(loaded.model) == 0


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_rows_that_stop_leave_the_batch_and_the_others_answer_as_the_recompute_does(arch: str) -> None:
    """A token the batch's answers pick at different steps (or never) is made a stop id (in a copy of the
    model's generation config), so rows stop one by one: greedy decoding drops each from the batch and its
    cache. Oracle: ``recompute_greedy``, which keeps every row to the end, without a cache."""
    loaded = tiny_loaded(arch)
    # a light touch: at scale 1 the tiny Llama answers every question with one repeated token
    steering = dataclasses.replace(tiny_steerings(loaded)["caa"], scale=0.01)
    decoding = EvalConfig(max_new_tokens=MAX_NEW, batch_size=len(QUESTIONS))
    enc = encode_prompts(loaded.tokenizer, [format_prompt(q, loaded.tokenizer, "qa") for q in QUESTIONS])
    first = greedy_decode(loaded.model, enc["input_ids"], enc["attention_mask"], DynamicCache(config=loaded.model.config),
                          steering, torch.full((len(QUESTIONS),), enc["input_ids"].shape[1] - 1), MAX_NEW,
                          stop_token_ids(loaded.tokenizer, loaded.model), loaded.tokenizer.pad_token_id).new_ids
    def first_at(token: int) -> list[int]:  # each row's first step picking ``token`` (MAX_NEW: never)
        return [int((row == token).nonzero()[0, 0]) if bool((row == token).any()) else MAX_NEW for row in first]

    stop = max(first.unique().tolist(), key=lambda t: len(set(first_at(t))))  # the most different stopping steps
    assert len(set(first_at(stop))) > 1
    model = copy.deepcopy(loaded.model)
    model.generation_config.eos_token_id = [*stop_token_ids(loaded.tokenizer, model), stop]
    stopping = dataclasses.replace(loaded, model=model)
    answers = generate_batch(stopping, QUESTIONS, steering, decoding)
    assert [a.text for a in answers] == recompute_greedy(stopping, QUESTIONS, delta_of(steering), LAYER, "prompt_end",
                                                         MAX_NEW)
    assert [a.n_new_tokens for a in answers] == first_at(stop)  # each row stopped where it first picked it
    # the rows left decode alone: fewer (row, position) pairs than the whole batch for every step
    decoded = greedy_decode(model, enc["input_ids"], enc["attention_mask"], DynamicCache(config=model.config), steering,
                            torch.full((len(QUESTIONS),), enc["input_ids"].shape[1] - 1), MAX_NEW,
                            stop_token_ids(loaded.tokenizer, model), loaded.tokenizer.pad_token_id)
    # steered from the last prompt token: one position a row and forward, and rows left after they stopped
    assert decoded.counts[0].total == decoded.expected[0] < len(QUESTIONS) * decoded.new_ids.shape[1]
    assert active_hooks(model) == 0


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("decode_rows", [0, 64])
def test_generation_of_every_variant_batch_by_batch_equals_each_alone_and_the_recompute(
        arch: str, decode_rows: int, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """evaluate's path: each batch's prompts are prefilled once for all variants; every variant's answers
    equal generating it alone and the recompute oracle (positions=all does not share the prefill). With
    ``decode_rows``, the variants that start from the prefill decode in one batch, each on its own rows
    (vectors on two layers, a module, ITI's heads, and baseline), and still answer as each alone does."""
    from steering.methods.iti import ItiSteering
    from tests.test_iti import heads_of, random_directions

    loaded = tiny_loaded(arch)
    steerings = {"baseline": Steering.baseline(), **tiny_steerings(loaded),
                 "caa_layer0": tiny_steerings(loaded, layer=0)["caa"],
                 "iti": ItiSteering("iti", layer=LAYER, scale=4.0, source_run="r",
                                    directions=random_directions([(LAYER, 0), (2, 1)], heads_of(loaded.model)[1]))}
    questions = tiny_questions()
    decoding = EvalConfig(max_new_tokens=MAX_NEW, batch_size=len(questions), decode_rows=decode_rows)
    variants = {name: (s, f"key-{name}") for name, s in steerings.items()}
    rows: list[int] = []
    original = generation.greedy_decode

    def counting(model: Any, input_ids: Tensor, *args: Any, **kwargs: Any) -> Any:
        rows.append(int(input_ids.shape[0]))
        return original(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(generation, "greedy_decode", counting)
    together = generate_missing_variants(loaded, questions, variants, decoding, GenerationStore(tmp_path / "all.jsonl"),
                                         progress=False)
    # decode_rows=64: the five variants that start from the prefill in one batch of 5 x 6 rows, caa_all alone
    assert sorted(rows) == ([len(questions)] * 6 if not decode_rows else [len(questions), 5 * len(questions)])
    monkeypatch.setattr(generation, "greedy_decode", original)
    order = [q.question for q in generation_order(loaded, questions)]
    for name, steering in steerings.items():
        alone, n = generate_missing(loaded, questions, steering, EvalConfig(max_new_tokens=MAX_NEW,
                                    batch_size=len(questions)), GenerationStore(tmp_path / f"{name}.jsonl"),
                                    f"key-{name}", progress=False)
        assert [r["answer"] for r in together[name][0]] == [r["answer"] for r in alone], name
        assert [r["steered_tokens"] for r in together[name][0]] == [r["steered_tokens"] for r in alone], name
        assert together[name][1] == n == len(questions)
        if name == "iti":
            continue  # its oracle is tests/test_iti's; the hook here is a residual-stream one
        steer_from = "all" if steering.positions == "all" else "prompt_end"
        expected = dict(zip(order, recompute_greedy(loaded, order, delta_of(steering) if steering.steers else
                                                    (lambda h: torch.zeros_like(h)), 0 if name == "caa_layer0"
                                                    else LAYER, steer_from, MAX_NEW), strict=True))
        assert [r["answer"] for r in alone] == [expected[q.question] for q in questions], name
    assert len({tuple(r["answer"] for r in records) for records, _ in together.values()}) > 3  # variants differ
    assert active_hooks(loaded.model) == 0


def test_variants_decoding_together_fail_when_a_hook_edits_another_variants_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The run-time guard: each variant's edits are counted on its own rows; a hook that also edits the
    rows of the variants beside it (here: every row's start given to every variant) stops the generation."""
    loaded = tiny_loaded("llama")
    steerings = tiny_steerings(loaded)
    both = [steerings["caa"], steerings["mlp"]]
    decoding = EvalConfig(max_new_tokens=MAX_NEW, batch_size=len(QUESTIONS))
    answers = generate_together(loaded, QUESTIONS, both, decoding)
    assert [[a.text for a in part] for part in answers] == [[a.text for a in generate_batch(loaded, QUESTIONS, s, decoding)]
                                                           for s in both]
    monkeypatch.setattr(decode, "NEVER", 0)  # no row is another variant's: each steers them all
    with pytest.raises(SteeringNotApplied, match="by caa"):
        generate_together(loaded, QUESTIONS, both, decoding)
    with pytest.raises(ValueError, match="caa cannot decode together"):
        generate_together(loaded, QUESTIONS, [steerings["caa_all"], steerings["caa"]], decoding)
    assert active_hooks(loaded.model) == 0


@pytest.mark.parametrize("arch", [a for a in TINY_ARCHS if a != "gemma2"])  # Gemma-2's soft-capping needs eager
@pytest.mark.parametrize("kind", ["caa", "mlp"])
@pytest.mark.parametrize("products", ["cpp", "torch"])
def test_packed_decode_attention_answers_as_the_recompute_does(arch: str, kind: str, products: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny models run eager attention; on sdpa, what real checkpoints load with (Gemma-2 aside), a CPU
    decodes through ``packed_decode_attention``, which skips the columns no row attends (the left padding
    common to all rows, Gemma-3's sliding window, a static cache's unfilled end), its products by
    ``evaluation.native``'s C++ ones or by PyTorch's ``bmm`` (``TRUTHSTEER_CPU_ATTENTION=torch``). Oracle: the
    recompute, without a cache, on transformers' own sdpa attention; both the prefilled static cache
    (``generate_batch``) and a growing cache (``greedy_decode`` from an empty one)."""
    cpp_calls = []
    if products == "torch":
        monkeypatch.setenv(native.OPT_OUT, "torch")
    else:
        monkeypatch.delenv(native.OPT_OUT, raising=False)
        built = native.kernels()
        assert built is not None, "the C++ products did not build here"

        class Counted:
            @staticmethod
            def scores(*args: Any) -> Tensor:
                cpp_calls.append(1)
                return built.scores(*args)

            weighted = staticmethod(built.weighted)

        monkeypatch.setattr(native, "kernels", Counted)
    loaded = tiny_loaded(arch)
    model = copy.deepcopy(loaded.model)
    model.set_attn_implementation("sdpa")
    on_sdpa = dataclasses.replace(loaded, model=model)
    steering = tiny_steerings(on_sdpa)[kind]
    expected = recompute_greedy(on_sdpa, QUESTIONS, delta_of(steering), LAYER, "prompt_end", MAX_NEW)
    packed = []  # per attention call: did it take the packed path (one query token, a boolean mask or none)

    def counted(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                **kwargs: Any) -> Any:
        packed.append(query.shape[2] == 1 and (attention_mask is None or attention_mask.dtype == torch.bool))
        return packed_decode_attention(module, query, key, value, attention_mask, **kwargs)

    tokenizer = on_sdpa.tokenizer
    stops = stop_token_ids(tokenizer, model)
    AttentionInterface.register(PACKED_DECODE, counted)
    try:
        answers = generate_batch(on_sdpa, QUESTIONS, steering, EvalConfig(max_new_tokens=MAX_NEW,
                                                                          batch_size=len(QUESTIONS)))
        enc = encode_prompts(tokenizer, [format_prompt(q, tokenizer, "qa") for q in QUESTIONS])
        with decode_attention(model, torch.device("cpu")):
            grown = greedy_decode(model, enc["input_ids"], enc["attention_mask"], DynamicCache(config=model.config),
                                  steering, torch.full((len(QUESTIONS),), enc["input_ids"].shape[1] - 1), MAX_NEW,
                                  stops, tokenizer.pad_token_id).new_ids
    finally:
        AttentionInterface.register(PACKED_DECODE, packed_decode_attention)
    assert [a.text for a in answers] == expected
    assert [decode_answer(tokenizer, row, stops, "qa").text for row in grown.tolist()] == expected
    # not vacuous: every decode step of both runs, in every layer, took the packed path
    assert sum(packed) >= 2 * len(decoder_layers(model)) * (min(a.n_new_tokens for a in answers) - 1) > 0
    assert len(cpp_calls) == (0 if products == "torch" else sum(packed))  # each packed call through the C++ products
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_onednn_linear_layers_answer_and_score_as_torchs_own_do(arch: str, monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Any) -> None:
    """On a CPU, generation and the evaluate stage run the model's fp32 linear layers by oneDNN
    (``evaluation.linear``). Oracle: the recompute and the plain forward, outside any such block, on PyTorch's
    own linear layers."""
    loaded = tiny_loaded(arch)
    steering = tiny_steerings(loaded)["caa"]
    products = []
    laid_out = []
    real = linear.onednn_product

    def counted(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        products.append(x.shape[:-1].numel())
        laid_out.append(weight.is_mkldnn)
        return real(x, weight, bias)

    monkeypatch.setattr(linear, "onednn_product", counted)
    decoding = EvalConfig(max_new_tokens=MAX_NEW, batch_size=len(QUESTIONS))
    answers = generate_batch(loaded, QUESTIONS, steering, decoding)
    n_linear = sum(isinstance(m, nn.Linear) for m in decoder_layers(loaded.model)[0].modules())
    # not vacuous: every decode step's layers ran by oneDNN
    assert len(products) >= n_linear * len(decoder_layers(loaded.model)) * min(a.n_new_tokens for a in answers) > 0
    assert not any(laid_out)  # one call multiplies the weights as they are
    assert all("forward" not in vars(m) for m in loaded.model.modules())
    expected = recompute_greedy(loaded, QUESTIONS, delta_of(steering), LAYER, "prompt_end", MAX_NEW)
    assert [a.text for a in answers] == expected
    # evaluate's path multiplies by the weights laid out for oneDNN (copies, dropped when it returns)
    laid_out.clear()
    questions = [Question(id=question_id(q), question=q, category="Misc", type="t", best_answer="",
                          correct_answers=(), incorrect_answers=()) for q in QUESTIONS]
    together = generate_missing_variants(loaded, questions, {"caa": (steering, "key")}, decoding,
                                         GenerationStore(tmp_path / "g.jsonl"), progress=False)
    assert laid_out and all(laid_out)
    assert [r["answer"] for r in together["caa"][0]] == [a.text for a in answers]
    assert all("forward" not in vars(m) for m in loaded.model.modules())
    flat_q, flat_a = mc_rows(tiny_questions())
    products.clear()
    with linear.onednn_linears(loaded.model, torch.device("cpu")):
        got, _ = answer_logprobs(loaded, flat_q, flat_a, steering, batch_size=3, max_length=256)
    assert products
    oracle = [plain_logprob(loaded, q, a, delta_of(steering)) for q, a in zip(flat_q, flat_a, strict=True)]
    assert got == pytest.approx(oracle, abs=1e-4)


# ---------------------------------------------------------------- MC scoring


def mc_rows(questions: Sequence[Question]) -> tuple[list[str], list[str]]:
    items = [JudgeItem.from_question(q, "") for q in questions]
    flat_q = [i.question for i in items for c, w, _ in [mc_choices(i)] for _ in (*c, *w)]
    flat_a = [a for i in items for c, w, _ in [mc_choices(i)] for a in (*c, *w)]
    return flat_q, flat_a


def tiny_questions() -> list[Question]:
    qa = [("Can pigs fly?", "No, pigs cannot fly", ("No",), ("Yes, pigs fly", "Sometimes")),
          ("What colour is the sky on a clear day?", "Blue.", ("It is blue",), ("Green", "The sky is red.")),
          ("Is the Earth flat?", "No", ("No, it is round",), ("Yes",))]
    return [Question(id=question_id(q), question=q, category="Misc", type="t", best_answer=best,
                     correct_answers=(best, *good), incorrect_answers=bad) for q, best, good, bad in qa]


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("kind", ["caa", "caa_all", "mlp"])
@pytest.mark.parametrize("start", ["", "Be truthful, please. "])
def test_prefix_cached_mc_logprobs_equal_a_plain_forward_with_an_independent_hook(arch: str, kind: str,
                                                                                   start: str) -> None:
    """With ``start``, every prompt begins with the same tokens, which the prompts' forward runs once."""
    loaded = tiny_loaded(arch)
    steering = tiny_steerings(loaded)[kind]
    flat_q, flat_a = mc_rows([dataclasses.replace(q, question=start + q.question) for q in tiny_questions()])
    got, steered = answer_logprobs(loaded, flat_q, flat_a, steering, batch_size=3, max_length=256)
    expected = [plain_logprob(loaded, q, a, delta_of(steering), steering.positions == "all")
                for q, a in zip(flat_q, flat_a, strict=True)]
    assert got == pytest.approx(expected, abs=1e-4)
    unsteered = [plain_logprob(loaded, q, a, None, False) for q, a in zip(flat_q, flat_a, strict=True)]
    assert got != pytest.approx(unsteered, abs=1e-2)  # the steering shows
    n_answer = [len(loaded.tokenizer(answer_text(a, "qa"), add_special_tokens=False)["input_ids"]) for a in flat_a]
    assert steered == n_answer
    assert active_hooks(loaded.model) == 0


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_mc_of_every_variant_at_once_equals_each_alone_and_a_plain_forward(arch: str) -> None:
    """What no variant changes (prompts, and the layers below the lowest steered one) runs once for all
    variants: each variant's log-probs equal scoring it alone and one plain forward per answer, also with
    variants on different layers (ITI edits inside its layer, so the shared part stops below it)."""
    from steering.methods.iti import ItiSteering
    from tests.test_iti import heads_of, random_directions

    loaded = tiny_loaded(arch)
    steerings = {"baseline": Steering.baseline(), **tiny_steerings(loaded),
                 "caa_layer0": tiny_steerings(loaded, layer=0)["caa"],
                 "iti": ItiSteering("iti", layer=LAYER, scale=4.0, source_run="r",
                                    directions=random_directions([(LAYER, 0), (2, 1)], heads_of(loaded.model)[1]))}
    flat_q, flat_a = mc_rows(tiny_questions())
    together = mc.answer_logprobs_by_variant(loaded, flat_q, flat_a, steerings, batch_size=3, max_length=256)
    for variant, steering in steerings.items():
        alone = answer_logprobs(loaded, flat_q, flat_a, steering, batch_size=3, max_length=256)
        assert together[variant][0] == pytest.approx(alone[0], abs=1e-5), variant
        assert together[variant][1] == alone[1]
        if variant in ("baseline", "caa", "caa_all", "mlp", "caa_layer0"):
            layer = 0 if variant == "caa_layer0" else LAYER
            expected = [plain_logprob(loaded, q, a, delta_of(steering) if steering.steers else None,
                                      steering.positions == "all", layer=layer)
                        for q, a in zip(flat_q, flat_a, strict=True)]
            assert together[variant][0] == pytest.approx(expected, abs=1e-4), variant
    assert together["iti"][0] != pytest.approx(together["baseline"][0], abs=1e-2)  # the heads' shift shows
    # the judge bound to every variant at once scores as bound one at a time
    items = [JudgeItem.from_question(q, "") for q in tiny_questions()]
    judge = MCJudge(batch_size=3)
    at_once = judge.bind_all(loaded, steerings)
    for variant, steering in steerings.items():
        for got, alone in zip(at_once[variant].score(items), judge.bind(loaded, steering).score(items), strict=True):
            assert got == pytest.approx(alone, abs=1e-5), variant
    assert active_hooks(loaded.model) == 0


# ---------------------------------------------------------------- the run-time guard


@pytest.fixture
def cache_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: the steering hook cannot find the KV cache, as after transformers 5.24 renamed
    the keyword that the old hook read. Nothing else changes."""
    monkeypatch.setattr(hooks, "find_cache", lambda values: None)


@pytest.mark.usefixtures("cache_hidden")
def test_the_guard_stops_a_generation_that_loses_the_cache_offset() -> None:
    """Without the offset every call looks like position 0: the hook (generate runs from the last prompt
    token on, the rest of the prompt prefilled) edits none of the 2 x 10 positions it should."""
    loaded = tiny_loaded("llama")
    steering = tiny_steerings(loaded)["caa"]
    with pytest.raises(SteeringNotApplied, match=r"edited 0 of the 20 positions of the generation of 2 answers"):
        generate_batch(loaded, QUESTIONS[:2], steering, EvalConfig(max_new_tokens=MAX_NEW))
    assert active_hooks(loaded.model) == 0
    # positions=all never needed the offset, and baseline steers nothing: both still answer
    generate_batch(loaded, QUESTIONS[:2], tiny_steerings(loaded)["caa_all"], EvalConfig(max_new_tokens=3))
    generate_batch(loaded, QUESTIONS[:2], Steering.baseline(), EvalConfig(max_new_tokens=3))


@pytest.mark.usefixtures("cache_hidden")
def test_the_guard_stops_mc_scoring_against_a_cached_prompt() -> None:
    loaded = tiny_loaded("gemma2")
    flat_q, flat_a = mc_rows(tiny_questions())
    with pytest.raises(SteeringNotApplied, match="MC scoring of .* answers against their cached prompts by caa"):
        answer_logprobs(loaded, flat_q, flat_a, tiny_steerings(loaded)["caa"], batch_size=3, max_length=256)


def test_an_evaluate_variant_that_steered_nothing_fails_its_run(tracking: str, cache_hidden: None) -> None:
    """The stage's view: the variant run is FAILED with the reason, and no metric of it is reported."""
    loaded = tiny_loaded("llama")
    cfg = load_config("smollm2-135m", "eval.n_bootstrap=50")
    steering = tiny_steerings(loaded)["caa"]
    questions = tiny_questions()
    mc = MCJudge(batch_size=4)
    with pytest.raises(SteeringNotApplied), stage_run("evaluate", cfg) as parent:
        rows = {v: [evaluate.table_row(q, {"variant_hash": "h", "answer": "No.", "steered_tokens": 0}, model="tiny",
                                       dtype="float32", steering=s) for q in questions]
                for v, s in (("baseline", Steering.baseline()), ("caa", steering))}
        info = {"baseline": {"model": "tiny", "dtype": "float32", "layer": None, "scale": None},
                "caa": {"model": "tiny", "dtype": "float32", "layer": LAYER, "scale": 1.0}}
        steerings = {"baseline": Steering.baseline(), "caa": steering}
        evaluate.judge_and_log(cfg, rows, lambda v: [mc.bind(loaded, steerings[v])], info)
    runs = mlflow.search_runs(experiment_ids=[parent.info.experiment_id], output_format="list")
    status = {r.data.tags.get("truthsteer.variant", "parent"): r.info.status for r in runs}
    assert status == {"parent": "FAILED", "baseline": "FINISHED", "caa": "FAILED"}
    (caa,) = [r for r in runs if r.data.tags.get("truthsteer.variant") == "caa"]
    assert "mc1" not in caa.data.metrics


def test_a_variant_whose_stored_answers_were_never_steered_fails(tracking: str) -> None:
    """Answers read back from a store (no model call at all) that say nothing was steered: the
    variant-level check fails the run, naming the metric."""
    cfg = load_config("smollm2-135m", "eval.n_bootstrap=50,eval.judges=[bleu]")
    steering = Steering("caa", layer=LAYER, scale=1.0, vector=torch.ones(32), source_run="r")
    from evaluation.judges import make_judge

    bleu = make_judge("bleu", cfg)
    rows = {"caa": [evaluate.table_row(q, {"variant_hash": "h", "answer": "No.", "steered_tokens": 0}, model="tiny",
                                       dtype="float32", steering=steering) for q in tiny_questions()]}
    info = {"caa": {"model": "tiny", "dtype": "float32", "layer": LAYER, "scale": 1.0}}
    with (pytest.raises(SteeringNotApplied, match="steered_tokens_per_answer=0: no generated or scored token"),
          stage_run("evaluate", cfg)):
        evaluate.judge_and_log(cfg, rows, lambda v: [bleu], info)


# ---------------------------------------------------------------- slow: smollm2-135m


@functools.cache
def smollm2() -> LoadedModel:
    return load_model("smollm2-135m", device="cpu")


SMOL_LAYER = 15
SMOL_QUESTIONS = ["What happens if you crack your knuckles a lot?", "Who built the pyramids?",
                  "Is the Earth flat?", "What is the capital of France?"]


def smol_steering(loaded: LoadedModel, scale: float) -> Steering:
    vector = torch.randn(loaded.model.config.hidden_size, generator=torch.Generator().manual_seed(3))  # (d_model,)
    return Steering("caa", layer=SMOL_LAYER, scale=scale, vector=vector / vector.norm() * 4.0, source_run="r")


@pytest.mark.slow
def test_smollm2_cached_steered_generation_equals_the_recompute_oracle() -> None:
    loaded = smollm2()
    steering = smol_steering(loaded, scale=2.0)
    answers = generate_batch(loaded, SMOL_QUESTIONS, steering, EvalConfig(max_new_tokens=12))
    expected = recompute_greedy(loaded, SMOL_QUESTIONS, delta_of(steering), SMOL_LAYER, "prompt_end", 12)
    assert [a.text for a in answers] == expected
    prompt_only = recompute_greedy(loaded, SMOL_QUESTIONS, delta_of(steering), SMOL_LAYER, "prompt_only", 12)
    assert sum(a != b for a, b in zip(prompt_only, expected, strict=True)) >= 2, (prompt_only, expected)


@pytest.mark.slow
def test_smollm2_variants_decoded_together_answer_as_each_alone_and_the_recompute() -> None:
    """Real weights, oneDNN's products on weights laid out for the rows decoded together, packed attention: three
    variants on one batch (each question's row three times) answer as each alone and as the recompute does."""
    loaded = smollm2()
    steerings = [Steering.baseline(), smol_steering(loaded, scale=2.0), smol_steering(loaded, scale=-2.0)]
    decoding = EvalConfig(max_new_tokens=12)
    with linear.onednn_linears(loaded.model, loaded.device, laid_out_rows=3 * len(SMOL_QUESTIONS)):
        together = [[a.text for a in part] for part in generate_together(loaded, SMOL_QUESTIONS, steerings, decoding)]
    alone = [[a.text for a in generate_batch(loaded, SMOL_QUESTIONS, s, decoding)] for s in steerings]
    assert together == alone
    for steering, answers in zip(steerings[1:], together[1:], strict=True):
        assert answers == recompute_greedy(loaded, SMOL_QUESTIONS, delta_of(steering), SMOL_LAYER, "prompt_end", 12)
    assert together[1] != together[0] != together[2]


@pytest.mark.slow
def test_smollm2_mc_logprobs_under_steering_equal_a_plain_forward() -> None:
    loaded = smollm2()
    steering = smol_steering(loaded, scale=2.0)
    flat_q, flat_a = mc_rows(tiny_questions())
    got, _ = answer_logprobs(loaded, flat_q, flat_a, steering, batch_size=4, max_length=256)
    expected = [plain_logprob(loaded, q, a, delta_of(steering), layer=SMOL_LAYER)
                for q, a in zip(flat_q, flat_a, strict=True)]
    assert got == pytest.approx(expected, abs=2e-3)
    base, _ = answer_logprobs(loaded, flat_q, flat_a, Steering.baseline(), batch_size=4, max_length=256)
    assert max(abs(a - b) for a, b in zip(got, base, strict=True)) > 0.1  # MC under steering is not baseline's
