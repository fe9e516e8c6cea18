"""Training the MLP steering module: both speedups against the straightforward path, the frozen
model, the losses, seeding, and (slow) the whole stage on smollm2-135m with MLflow.

Oracles: the prefix-cache forward == the full forward with the steering hook (fp32, atol 1e-5) on
every tiny architecture, both branches and both steering positions; answer-only
log-probs == log_softmax of the full logits gathered; ``make_batch`` == ``encode_prompt_answers``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import sys
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from core.artifacts import MLP_DIR, TAG_BRANCH_RUN
from core.config import ConfigError, MLPConfig
from core.config_io import load_config
from core.data import Question, load_questions, question_id
from steering import logprobs
from steering.hooks import active_hooks, masked_mean, record_residuals
from steering.layers import d_model, decoder_layers
from steering.logprobs import (
    answer_head_logprobs,
    branch_loss,
    final_logit_softcap,
    full_logits_logprobs,
    sequence_logprobs,
    steered_answer_logprobs,
)
from steering.mlp import MLPSteering, MLPSteeringConfig, load_mlp
from steering.prefix import PrefixCache, suffix_answer_logprobs
from steering.prompts import answer_text, encode_prompt_answers, format_prompt, shared_prefix
from steering.sequences import encode_examples, make_batch, pick_incorrect
from steering.shared_start import forward_chunks, sliding_window
from steering.train import batch_order, fast_path_mismatch, subset, train_branch
from steering.vector_bank import VectorBank
from tests.conftest import DATA_CSV
from tests.tiny_models import PAD_ID, TINY_ARCHS, make_tiny

LAYER = 1  # of the 3 tiny layers: one below, one above


@functools.cache
def tiny(arch: str) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    model, tokenizer = make_tiny(arch)
    return model.requires_grad_(False), tokenizer


@functools.cache
def short_questions() -> tuple[Question, ...]:
    """Real TruthfulQA questions short enough for the tiny models' 128 positions (byte tokens)."""
    questions = load_questions(DATA_CSV)
    fits = [q for q in questions if len(q.question) + max(map(len, (q.best_answer, *q.incorrect_answers))) < 70]
    return tuple(fits[:12])


def random_bank(width: int, n_bank: int = 4, norm: float = 8.0) -> Tensor:
    bank = torch.randn(n_bank, width, generator=torch.Generator().manual_seed(1))  # (n_bank, d_model)
    return bank / bank.norm(dim=1, keepdim=True) * norm


def module_for(model: PreTrainedModel, *, trained: bool = True, scale: float = 3.0) -> MLPSteering:
    """A module for the tiny model; ``trained`` moves its zero-initialised weights off zero, so that
    the steering delta depends on the residual (the case the prefix cache must get right)."""
    width = d_model(model)
    torch.manual_seed(0)
    module = MLPSteering(MLPSteeringConfig("tiny", LAYER, width, 4, 2, scale), random_bank(width))
    if trained:
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for param in (module.gate.weight, module.down.weight):
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return module


def sequences(tokenizer: PreTrainedTokenizerFast, branch: str, questions: tuple[Question, ...] | None = None):
    return encode_examples(questions or short_questions()[:8], tokenizer, "qa", branch, max_length=128)


# ----------------------------------------------------------------------------------- batches


def test_make_batch_equals_encode_prompt_answers() -> None:
    _, tokenizer = tiny("llama")
    questions = short_questions()[:5]
    seqs = sequences(tokenizer, "mc", questions)
    prompts = [format_prompt(q.question, tokenizer, "qa") for q in questions for _ in range(2)]
    answers = [answer_text(a, "qa") for q in questions for a in (q.best_answer, pick_incorrect(q, 0))]
    expected = encode_prompt_answers(tokenizer, prompts, answers, 128)
    batch = make_batch(seqs, range(10), PAD_ID)
    for key in ("input_ids", "attention_mask", "answer_mask", "prompt_end"):
        assert torch.equal(getattr(batch, key), expected[key]), key
    assert seqs.n_examples == 5 and seqs.sequence_indices([3, 1]) == [6, 7, 2, 3]


def test_incorrect_answer_choice_is_seeded_per_question() -> None:
    q = short_questions()[0]
    assert pick_incorrect(q, 0) == pick_incorrect(q, 0) and pick_incorrect(q, 0) in q.incorrect_answers
    picks = {pick_incorrect(Question(question_id(f"q{i}"), f"q{i}", "c", "t", "b", ("b",), tuple("xyz")), 0)
             for i in range(40)}
    assert picks == {"x", "y", "z"}


def test_batch_order_is_seeded_and_cycles_through_the_split() -> None:
    order = batch_order(5, 2, 6, seed=0)
    assert order == batch_order(5, 2, 6, seed=0) and order != batch_order(5, 2, 6, seed=1)
    flat = [e for batch in order for e in batch]
    assert len(order) == 6 and all(len(b) == 2 for b in order)
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))
    with pytest.raises(ValueError, match="at least one example"):
        batch_order(0, 2, 1, seed=0)


# ------------------------------------------------------------------------- speedup 1: prefix cache


@pytest.mark.oracle
@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("positions", ["from_prompt_end", "all"])
@pytest.mark.parametrize("branch", ["mc", "gen"])
@pytest.mark.parametrize("start", ["", "Be truthful, please. "])
def test_prefix_cache_scoring_equals_full_scoring(arch: str, positions: str, branch: str, start: str) -> None:
    """With ``start``, every sequence begins with the same tokens, which the cache's forward runs once."""
    model, tokenizer = tiny(arch)
    module = module_for(model)
    questions = tuple(dataclasses.replace(q, question=start + q.question) for q in short_questions()[:8])
    seqs = sequences(tokenizer, branch, questions)
    if start:  # the shared start runs once (the tiny Gemmas' window, 6, is narrower: they run it per row)
        assert shared_prefix(seqs.token_ids, keep=1) >= len(start)
    # cached in batches of 3 sorted by length, read back in another grouping and padding
    cache = PrefixCache.build(model, LAYER, seqs, PAD_ID, batch_size=3, positions=positions)
    indices = seqs.sequence_indices([5, 0, 2, 7])
    batch = make_batch(seqs, indices, PAD_ID)
    layers_before = list(decoder_layers(model))
    with torch.no_grad():
        full = steered_answer_logprobs(model, module, batch, positions=positions, answer_only_head=False)
        plain = steered_answer_logprobs(model, module_for(model, scale=0.0), batch, positions=positions)
        for head in (False, True):
            fast, _ = suffix_answer_logprobs(model, cache.batch(indices),
                                             lambda: module.steering(model), answer_only_head=head)
            assert torch.allclose(fast, full, atol=1e-5, rtol=0)
    assert not torch.allclose(full, plain, atol=1e-2)  # the steering shows
    assert list(decoder_layers(model)) == layers_before and active_hooks(model) == 0
    # mc pairs share their prompt: with from_prompt_end each distinct prefix is stored once
    expected_prefixes = 0 if positions == "all" else \
        len({ids[:n] for ids, n in zip(seqs.token_ids, cache.splits, strict=True)})
    assert len(cache.prefixes) == expected_prefixes == (0 if positions == "all" else seqs.n_examples)


@pytest.mark.oracle
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_a_prefix_forward_lets_each_layers_keys_and_values_go_once_it_has_run(arch: str) -> None:
    """``SuffixBatch.one_forward``: while a layer runs, the layers below it hold nothing in the forward's cache
    (their concatenations were let go) and the layers above still hold the prefix; the log-probs are those of a
    forward that keeps every layer's (``cache()``), and no hook is left behind."""
    model, tokenizer = tiny(arch)
    module = module_for(model)
    seqs = sequences(tokenizer, "mc")
    cache = PrefixCache.build(model, LAYER, seqs, PAD_ID, batch_size=3)
    batch = cache.batch(seqs.sequence_indices([5, 0, 2, 7]))
    layers = decoder_layers(model)
    seen: list[list[int]] = []
    held: list[Any] = []

    def look(module_: torch.nn.Module, args: Any) -> None:  # a pre-hook on the last layer
        seen.append([int(layer.keys.shape[2]) for layer in held[0].layers])

    original = type(batch).one_forward

    @contextlib.contextmanager
    def watched(self: Any, model_: torch.nn.Module) -> Any:
        with original(self, model_) as forward_cache:
            held[:] = [forward_cache]
            yield forward_cache

    keeping = lambda self, model_: contextlib.nullcontext(self.cache())  # noqa: E731
    with torch.no_grad():
        handle = layers[-1].register_forward_pre_hook(look)
        try:
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(type(batch), "one_forward", watched)
                released, _ = suffix_answer_logprobs(model, batch, lambda: module.steering(model))
        finally:
            handle.remove()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(type(batch), "one_forward", keeping)
            kept, _ = suffix_answer_logprobs(model, batch, lambda: module.steering(model))
    width = batch.prefix_width
    assert seen == [[0] * (len(layers) - 1) + [width]]  # the layers below (stand-ins too) let go; the last not yet
    assert torch.equal(released, kept)
    assert active_hooks(model) == 0 and all(not m._forward_hooks for m in layers)


@pytest.mark.oracle
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_forward_chunks_in_length_groups_hold_what_each_row_alone_computes(arch: str) -> None:
    """Chunks of 5 rows that share 12 first tokens, each chunk's rest in groups of similar length (the tiny
    Gemma-2's window, 6, is narrower than the rows: no shared start, groups alone). Oracle: a forward of each
    row alone, without padding; its cache and ``output_hidden_states`` (entry ``LAYER + 1`` is that layer's
    output, not normed)."""
    model, _ = tiny(arch)
    generator = torch.Generator().manual_seed(0)
    start = torch.randint(6, 262, (12,), generator=generator).tolist()
    rows = [start + torch.randint(6, 262, (n,), generator=generator).tolist() for n in (1, 2, 3, 15, 16, 30, 31, 8)]
    seen: list[int] = []
    n_groups = 0
    with torch.no_grad():
        for group, width, cache, acts in forward_chunks(model, rows, PAD_ID, 5, [LAYER]):
            n_groups += 1
            for row, i in enumerate(group):
                seen.append(i)
                alone = model.base_model(input_ids=torch.tensor([rows[i]]), use_cache=True, output_hidden_states=True)
                first = width - len(rows[i])
                assert torch.allclose(acts[LAYER][row, first:], alone.hidden_states[LAYER + 1][0], atol=1e-5, rtol=0)
                for mine, theirs in zip(cache.layers, alone.past_key_values.layers, strict=True):
                    kept = theirs.keys.shape[2]  # a sliding layer of the model's own cache keeps its window's
                    assert kept == len(rows[i]) or arch != "llama"
                    assert torch.allclose(mine.keys[row, :, width - kept:width], theirs.keys[0], atol=1e-5, rtol=0)
                    assert torch.allclose(mine.values[row, :, width - kept:width], theirs.values[0], atol=1e-5, rtol=0)
    assert sorted(seen) == list(range(len(rows)))  # every row once
    assert n_groups > 2  # two chunks, and at least one of them in several groups
    # every chunk shares its 12 first tokens: Llama runs them once, the tiny Gemma-2 (window 6) per row
    assert shared_prefix(rows[:5], keep=1) >= 12 and (sliding_window(model) is None) == (arch == "llama")


def test_prefix_cache_batch_layout() -> None:
    model, tokenizer = tiny("llama")
    seqs = sequences(tokenizer, "gen")
    cache = PrefixCache.build(model, LAYER, seqs, PAD_ID, batch_size=4)
    indices = [6, 1, 4]
    batch = cache.batch(indices)
    splits = [len(seqs.token_ids[i]) - seqs.n_answer[i] - 1 for i in indices]
    assert cache.splits == [len(ids) - n - 1 for ids, n in zip(seqs.token_ids, seqs.n_answer, strict=True)]
    width = max(splits)
    for row, i in enumerate(indices):
        suffix = seqs.token_ids[i][splits[row]:]  # the last prompt token, then the answer
        assert batch.input_ids[row, :len(suffix)].tolist() == list(suffix)
        assert batch.input_ids[row, len(suffix):].eq(PAD_ID).all()
        assert batch.attention_mask[row].tolist() == [0] * (width - splits[row]) + [1] * splits[row] + \
            [1] * len(suffix) + [0] * (batch.input_ids.shape[1] - len(suffix))
        assert batch.position_ids[row, :len(suffix)].tolist() == list(range(splits[row], len(seqs.token_ids[i])))
        assert batch.answer_mask[row].tolist()[:len(suffix)] == [0] + [1] * seqs.n_answer[i]
    assert len(batch.past) == len(decoder_layers(model)) and batch.past[0][0].shape[2] == width
    with pytest.raises(ValueError, match="cached residual has shape"), torch.no_grad():
        wrong = dataclasses.replace(batch, residual=batch.residual[:2])
        suffix_answer_logprobs(model, wrong, lambda: module_for(model).steering(model))
    assert active_hooks(model) == 0


@pytest.mark.oracle
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_fast_path_self_check_accepts_every_arch_and_catches_a_wrong_cache(arch: str) -> None:
    model, tokenizer = tiny(arch)
    module = module_for(model)
    seqs = subset(sequences(tokenizer, "mc"), [0, 3, 4])
    for positions in ("from_prompt_end", "all"):
        assert fast_path_mismatch(model, module, seqs, PAD_ID, positions) == ""
    cache = PrefixCache.build(model, LAYER, seqs, PAD_ID, batch_size=6)
    noise = torch.Generator().manual_seed(3)
    cache.residuals = [r + 3 * torch.randn(r.shape, generator=noise) for r in cache.residuals]
    reason = fast_path_mismatch(model, module, seqs, PAD_ID, "from_prompt_end", cache=cache)
    assert reason.startswith("fast-path log-probs differ from the full forward's by up to")
    cache.residuals = [r[:-1] for r in cache.residuals]  # one suffix token short: shapes disagree
    reason = fast_path_mismatch(model, module, seqs, PAD_ID, "from_prompt_end", cache=cache)
    assert reason.startswith("the fast path raised"), reason


# ---------------------------------------------------------------------- speedup 2: answer-only head


def _answer_head_case(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> tuple[Tensor, Tensor]:
    batch = make_batch(sequences(tokenizer, "mc"), [0, 1, 6, 9, 12], PAD_ID)
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
        head = answer_head_logprobs(model, out.hidden_states[-1], batch.input_ids, batch.answer_mask)
    logp = out.logits.float().log_softmax(-1)  # (batch, seq, vocab)
    expected = torch.cat([  # row by row, token by token: logit at t scores token t + 1
        torch.stack([logp[row, t - 1, batch.input_ids[row, t]] for t in range(logp.shape[1])
                     if batch.answer_mask[row, t]])
        for row in range(logp.shape[0])
    ])
    assert torch.equal(full_logits_logprobs(out.logits, batch.input_ids, batch.answer_mask), expected)
    n_answer = batch.answer_mask.sum(dim=1)  # (batch,)
    sums = torch.stack([chunk.sum() for chunk in expected.split(n_answer.tolist())])
    assert torch.allclose(sequence_logprobs(expected, batch.answer_mask), sums, atol=1e-5)
    return head, expected


@pytest.mark.oracle
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_answer_only_head_equals_full_logits_gather(arch: str) -> None:
    model, tokenizer = tiny(arch)
    head, expected = _answer_head_case(model, tokenizer)
    assert torch.allclose(head, expected, atol=1e-5, rtol=0)
    assert final_logit_softcap(model) == (30.0 if arch == "gemma2" else None)


@pytest.mark.oracle
@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_answer_only_head_in_chunks_equals_full_logits_gather(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The LM head runs over ``HEAD_CHUNK`` answer tokens at a time (a bounded transient); a batch with many
    chunks, the last one partial, gives the full forward's log-probs."""
    monkeypatch.setattr(logprobs, "HEAD_CHUNK", chunk)
    model, tokenizer = tiny("gemma2")
    head, expected = _answer_head_case(model, tokenizer)
    assert len(expected) > 3 * chunk and len(expected) % 7 != 0
    assert torch.allclose(head, expected, atol=1e-5, rtol=0)


@pytest.mark.oracle
def test_answer_only_head_follows_each_class_on_softcapping() -> None:
    # Gemma3ForCausalLM applies final_logit_softcapping; Gemma3ForConditionalGeneration ignores its
    # text config's value (transformers 5.23). The answer head must match each model's own logits.
    for arch, expected_cap in (("gemma3", 2.0), ("gemma3_mm", None)):
        model, tokenizer = make_tiny(arch)
        model.config.get_text_config().final_logit_softcapping = 2.0
        assert final_logit_softcap(model) == expected_cap
        head, expected = _answer_head_case(model, tokenizer)
        assert torch.allclose(head, expected, atol=1e-5, rtol=0)
        if expected_cap:
            assert float(expected.min()) > -2 * 2.0 - 6  # capped logits: log-probs >= -2 cap - log(vocab)


# ---------------------------------------------------------------------------------------- losses


def test_branch_losses_match_their_definitions() -> None:
    answer_mask = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1], [0, 1, 1, 1], [0, 0, 1, 1]])  # (batch, seq)
    token_logp = torch.tensor([-1.0, -2.0, -0.5, -0.1, -0.2, -0.3, -4.0, -0.25])  # 2 + 1 + 3 + 2 tokens
    loss, count = branch_loss("gen", token_logp, answer_mask, margin=1.0)
    assert count == 8 and torch.equal(loss, -token_logp.sum())
    # sequence sums: -3, -0.5, -0.6, -4.25; pairs (correct, incorrect): gaps -2.5 and 3.65
    loss, count = branch_loss("mc", token_logp, answer_mask, margin=1.0)
    assert count == 2 and torch.allclose(loss, torch.tensor(3.5))  # relu(1 + 2.5) + relu(1 - 3.65)


# -------------------------------------------------------------------------------------- training


def _train(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, branch: str, *, steps: int = 2,
           lr: float = 1e-2, fast_path: bool = True, module: MLPSteering | None = None):
    module = module or module_for(model, trained=False)
    train, val = sequences(tokenizer, branch, short_questions()[:4]), sequences(tokenizer, branch, short_questions()[4:6])
    cfg = MLPConfig(steps=steps, lr=lr, batch_size=2, seed=0)
    return train_branch(model, module, train, val, branch=branch, cfg=cfg, positions="from_prompt_end",
                        pad_id=PAD_ID, eval_batch_size=4, fast_path=fast_path, log_metrics=False, progress=False)


def test_no_gradient_reaches_the_model_and_the_module_learns() -> None:
    model, tokenizer = make_tiny("llama")  # fresh: requires_grad is on until training freezes it
    assert all(p.requires_grad for p in model.parameters())
    weights = copy.deepcopy(model.state_dict())
    module = module_for(model, trained=False)
    init = copy.deepcopy(module.state_dict())
    result = _train(model, tokenizer, "mc", module=module)
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert all(torch.equal(value, weights[key]) for key, value in model.state_dict().items())
    assert torch.equal(module.bank, init["bank"])
    for name in ("gate.weight", "down.weight", "down.bias"):
        assert not torch.equal(module.state_dict()[name], init[name]), name
    assert all(p.grad is not None for p in module.parameters()) and result.fast_path == "on"
    assert list(decoder_layers(model)) == list(model.model.layers) and active_hooks(model) == 0


@pytest.mark.parametrize(("branch", "drop"), [("mc", 4.0), ("gen", 0.15)])
def test_loss_decreases_on_a_tiny_overfit_problem(branch: str, drop: float) -> None:
    # A random tiny model bounds how far steering one layer can move its answers (gen starts at
    # about log(vocab) = 5.57 nats): 12 seeded steps reach drops of 5.3 (mc) and 0.21 (gen).
    model, tokenizer = tiny("gemma2")
    result = _train(model, tokenizer, branch, steps=12, lr=3e-2)
    assert len(result.train_losses) == len(result.val_losses) == len(result.step_seconds) == 12
    assert result.final_train_loss < result.initial_train_loss - drop, (result.initial_train_loss, result.final_train_loss)
    assert result.final_val_loss == result.val_losses[-1]


def hand_answer_logprobs(model: PreTrainedModel, module: MLPSteering, ids: tuple[int, ...], n_answer: int) -> Tensor:
    """One unpadded sequence, forwarded whole with a hook written here: ``module(h)`` added to layer LAYER's
    output from the last prompt token on; the answer tokens' log-probs from the full logits."""
    start = len(ids) - n_answer - 1  # the last prompt token

    def hook(_: torch.nn.Module, args: object, output: object) -> object:
        hidden = output[0] if isinstance(output, tuple) else output  # (1, seq, d_model)
        assert isinstance(hidden, Tensor)
        edited = torch.cat([hidden[:, :start], hidden[:, start:] + module(hidden[:, start:].float())], dim=1)
        return (edited, *output[1:]) if isinstance(output, tuple) else edited

    handle = decoder_layers(model)[LAYER].register_forward_hook(hook)
    try:
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()  # (seq, vocab)
    finally:
        handle.remove()
    logp = logits.log_softmax(-1)
    return torch.stack([logp[t - 1, ids[t]] for t in range(len(ids) - n_answer, len(ids))])  # (n_answer,)


def hand_joint_loss(model: PreTrainedModel, module: MLPSteering, questions: tuple[Question, ...],
                    tokenizer: PreTrainedTokenizerFast, examples: list[int], mc_weight: float, gen_weight: float,
                    margin: float) -> float:
    """mc_weight x mean over ``examples`` of relu(margin - (logp best - logp incorrect)) + gen_weight x mean NLL
    over every best-answer token of ``examples``."""
    mc, gen = sequences(tokenizer, "mc", questions), sequences(tokenizer, "gen", questions)
    with torch.no_grad():
        hinges, nll = [], []
        for e in examples:
            best, wrong = (hand_answer_logprobs(model, module, mc.token_ids[i], mc.n_answer[i]).sum()
                           for i in (2 * e, 2 * e + 1))
            hinges.append(float(torch.relu(margin - (best - wrong))))
            nll += (-hand_answer_logprobs(model, module, gen.token_ids[e], gen.n_answer[e])).tolist()
    return mc_weight * sum(hinges) / len(hinges) + gen_weight * sum(nll) / len(nll)


@pytest.mark.oracle
@pytest.mark.parametrize("fast_path", [True, False])
def test_joint_branch_loss_is_the_weighted_sum_of_both_branch_losses_by_hand(fast_path: bool) -> None:
    model, tokenizer = tiny("gemma2")
    train_q, val_q = short_questions()[:4], short_questions()[4:7]
    split = {name: {b: sequences(tokenizer, b, qs) for b in ("mc", "gen")} for name, qs in (("train", train_q),
                                                                                          ("val", val_q))}
    cfg = MLPConfig(branch="joint", steps=2, lr=1e-2, batch_size=3, seed=0, margin=1.5, mc_weight=0.3, gen_weight=2.0)
    module = module_for(model)
    start = copy.deepcopy(module)
    result = train_branch(model, module, split["train"], split["val"], branch="joint", cfg=cfg,
                          positions="from_prompt_end", pad_id=PAD_ID, eval_batch_size=4, fast_path=fast_path,
                          log_metrics=False, progress=False)
    assert result.fast_path == ("on" if fast_path else "off")

    def hand(mod: MLPSteering, qs: tuple[Question, ...], examples: list[int]) -> float:
        return hand_joint_loss(model, mod, qs, tokenizer, examples, 0.3, 2.0, 1.5)

    first_batch = batch_order(4, 3, 2, seed=0)[0]
    assert result.initial_train_loss == pytest.approx(hand(start, train_q, [0, 1, 2, 3]), abs=1e-4)
    assert result.initial_val_loss == pytest.approx(hand(start, val_q, [0, 1, 2]), abs=1e-4)
    assert result.train_losses[0] == pytest.approx(hand(start, train_q, first_batch), abs=1e-4)
    assert result.final_train_loss == pytest.approx(hand(module, train_q, [0, 1, 2, 3]), abs=1e-4)
    assert result.final_val_loss == pytest.approx(hand(module, val_q, [0, 1, 2]), abs=1e-4)
    # neither branch's loss alone: the weights matter
    assert result.initial_train_loss != pytest.approx(hand_joint_loss(model, start, train_q, tokenizer, [0, 1, 2, 3],
                                                                      1.0, 1.0, 1.5), abs=1e-2)
    with pytest.raises(ValueError, match="joint branch trains on a mapping"):
        train_branch(model, module, split["train"]["mc"], split["val"]["mc"], branch="joint", cfg=cfg,
                     positions="from_prompt_end", pad_id=PAD_ID, log_metrics=False, progress=False)


@pytest.mark.oracle
def test_training_is_seeded_and_the_fast_path_trains_like_the_full_path() -> None:
    model, tokenizer = tiny("gemma3")
    fast = _train(model, tokenizer, "gen", steps=3)
    again = _train(model, tokenizer, "gen", steps=3)
    full = _train(model, tokenizer, "gen", steps=3, fast_path=False)
    assert fast.train_losses == again.train_losses and fast.val_losses == again.val_losses
    assert full.fast_path == "off"
    assert torch.allclose(torch.tensor(fast.train_losses), torch.tensor(full.train_losses), atol=1e-4, rtol=0)
    for key, value in fast.module.state_dict().items():
        assert torch.allclose(value, full.module.state_dict()[key], atol=1e-4), key


def test_bf16_model_with_fp32_module_trains() -> None:
    model, tokenizer = make_tiny("gemma3_mm")
    model = model.to(torch.bfloat16)
    result = _train(model, tokenizer, "mc", steps=2)
    assert result.fast_path == "on"
    assert all(p.dtype == torch.float32 for p in result.module.parameters())
    assert all(torch.isfinite(torch.tensor(v)) for v in result.train_losses + result.val_losses)
    assert all(p.grad is None for p in model.parameters())


def test_empty_split_is_a_config_error() -> None:
    model, tokenizer = tiny("llama")
    train = sequences(tokenizer, "gen", short_questions()[:2])
    with pytest.raises(ConfigError, match="train has 2 and val 0 questions"):
        train_branch(model, module_for(model), train, encode_examples([], tokenizer, "qa", "gen", max_length=64),
                     branch="gen", cfg=MLPConfig(), positions="all", pad_id=PAD_ID, log_metrics=False)


# ---------------------------------------------------------------------------- stage and entry point


def test_run_without_bank_run_is_a_config_error_that_says_the_fix(
    tracking: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from entrypoints import train as entry
    from stages import train

    cfg = load_config("smollm2-135m")
    with pytest.raises(ConfigError, match="train needs a vector bank: pass --bank-run"):
        train.run(cfg, bank_run="")
    argv = ["entrypoints.train", "--dry-run", "--branch", "gen", "--data", str(DATA_CSV)]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(ConfigError, match="train needs a vector bank"):
        entry.main()
    monkeypatch.setattr(sys, "argv", [*argv, "--bank-run", "abc123"])
    entry.main()
    out = capsys.readouterr().out
    assert "dry run of train" in out and "branches: gen (artifacts mlp/gen)" in out
    assert "  branch: gen" in out  # --branch reached the resolved config
    assert mlflow.search_runs(search_all_experiments=True).empty  # a dry run logs nothing
    monkeypatch.setattr(sys, "argv", ["entrypoints.train", "--dry-run", "--branch", "all", "--bank-run", "x"])
    with pytest.raises(ConfigError, match="mlp.branch='all' is not one of mc, gen, both"):
        entry.main()


@pytest.mark.slow
def test_train_stage_on_smollm2_both_branches(tracking: str, tmp_path: Path) -> None:
    from core.tracking import stage_run
    from stages import train

    layer, steps = 15, 10
    # 6 train and 3 val questions, 3 per step: on 2 CPU cores one sequence through the 14 layers
    # above layer 15, forward and backward, costs about 0.8 CPU-seconds (mc steps hold 6 sequences)
    overrides = [f"data.source={DATA_CSV}", "data.train=6", "data.val=3", "data.pool=4", "data.test=0",
                 "mlp.batch_size=3", f"steering.layer={layer}", "runtime.device=cpu"]
    cfg = load_config("smollm2-135m", overrides)
    assert cfg.mlp.steps == steps
    bank = diff_bank(cfg, layer)
    assert bank.shape == (7, 576)
    VectorBank(vectors=bank, layer=layer, model=cfg.model.alias, meta={"note": "test bank"}).save(tmp_path)
    with mlflow.start_run(run_name="bank") as bank_run:
        mlflow.log_artifacts(str(tmp_path / "bank"), "bank")
    with stage_run("train", cfg) as parent:
        modules = train.run(cfg, bank_run=bank_run.info.run_id)
    client = mlflow.MlflowClient()
    assert sorted(modules) == ["gen", "mc"]
    for branch, module in modules.items():
        child_id = client.get_run(parent.info.run_id).data.tags[TAG_BRANCH_RUN.format(branch=branch)]
        child = client.get_run(child_id)
        assert child.data.params["mlp.branch"] == branch and child.data.tags["truthsteer.fast_path"] == "on"
        metrics = child.data.metrics
        assert metrics["final_train_loss"] < metrics["initial_train_loss"], (branch, metrics)
        for name in ("train_loss", "val_loss"):
            history = client.get_metric_history(child_id, name)
            assert sorted(m.step for m in history) == list(range(1, steps + 1)), name
        for source in (parent.info.run_id, child_id):
            loaded = load_mlp(source, branch)
            for key, value in module.state_dict().items():
                assert torch.equal(loaded.state_dict()[key], value), (branch, key)
        assert client.list_artifacts(child_id, MLP_DIR.format(branch=branch))


def diff_bank(cfg, layer: int) -> Tensor:
    """A small real bank: the mean (correct - incorrect) answer-token residual over the pool questions,
    then 6 bootstrap resamples of the per-question differences."""
    from core.data import splits_for
    from core.models import load_from_config

    loaded = load_from_config(cfg)
    pool = splits_for(cfg)["pool"]
    prompts = [format_prompt(q.question, loaded.tokenizer, loaded.prompt_format) for q in pool for _ in range(2)]
    answers = [answer_text(a, loaded.prompt_format) for q in pool for a in (q.best_answer, q.incorrect_answers[0])]
    enc = encode_prompt_answers(loaded.tokenizer, prompts, answers, 256)
    with torch.no_grad(), record_residuals(loaded.model, [layer]) as acts:
        loaded.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    means = masked_mean(acts[layer], enc["answer_mask"])  # (2 * n_pool, d_model)
    diffs = means[0::2] - means[1::2]  # (n_pool, d_model)
    generator = torch.Generator().manual_seed(0)
    draws = [diffs[torch.randint(len(diffs), (len(diffs),), generator=generator)].mean(0) for _ in range(6)]
    return torch.stack([diffs.mean(0), *draws])  # (7, d_model)
