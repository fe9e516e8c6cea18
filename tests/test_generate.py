"""Steered batched generation and the generation store, on tiny random models (no downloads).

Oracles: batched left-padded greedy answers == one question at a time (fp32), for baseline, a CAA
vector and an MLP module; caa at scale 0 == baseline; the KV-cached steered generation == a
no-cache greedy loop steering the full sequence from the prompt end; a crashed run restarted
generates exactly the missing answers (counted at ``model.generate``) and ends with the records
of an uninterrupted run; a torn last line is dropped, a torn middle line is an error.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from transformers import DynamicCache, StaticCache

from core.config import EvalConfig, ModelSpec
from core.data import Question, question_id
from core.models import LoadedModel
from evaluation import generate as generation
from evaluation.generate import (
    decode_answer,
    generate_batch,
    generate_missing,
    generate_missing_variants,
    stop_token_ids,
)
from evaluation.generation_store import (
    GenerationStore,
    default_store_path,
    store_hash,
    variant_hash,
)
from evaluation.prefill import prefill_prompts
from steering.hooks import active_hooks, steer
from steering.layers import d_model
from steering.methods import method
from steering.methods.intervention import Steering, steering_key_fields
from steering.mlp import MLPSteering, MLPSteeringConfig
from steering.prompts import encode_text, format_prompt, shared_prefix
from steering.shared_start import length_groups
from tests.tiny_models import EOS_ID, TINY_ARCHS, make_tiny

QUESTIONS = [
    "What happens if you crack your knuckles a lot?",
    "Is it true?",
    "Which is the largest ocean on Earth, and why?",
    "Why?",
    "Where do fortune cookies come from?",
]
GREEDY = EvalConfig(max_new_tokens=10, batch_size=2)
LAYER = 1


@functools.cache
def tiny_loaded(arch: str, sliding_window: int = 6) -> LoadedModel:
    model, tokenizer = make_tiny(arch, sliding_window=sliding_window)
    spec = ModelSpec(alias=f"tiny-{arch}", source="hub", hf_id=f"tiny/{arch}",
                     architecture=arch, n_layers=3, d_model=32,  # type: ignore[arg-type]
                     n_params_b=0.0001, dtype="float32", prompt_format="qa")
    return LoadedModel(spec=spec, model=model, tokenizer=tokenizer, dtype=torch.float32,
                       device=torch.device("cpu"), prompt_format="qa")


def vector(loaded: LoadedModel, norm: float = 6.0) -> Tensor:
    v = torch.randn(d_model(loaded.model), generator=torch.Generator().manual_seed(7))  # (d_model,)
    return v / v.norm() * norm


def mlp_module(loaded: LoadedModel) -> MLPSteering:
    """The product's MLP module with its zero-initialised layers randomised, so its delta depends on h."""
    width = d_model(loaded.model)
    bank = torch.randn(3, width, generator=torch.Generator().manual_seed(3))  # (n_bank, d_model)
    module = MLPSteering(MLPSteeringConfig(model=loaded.spec.alias, layer=LAYER, d_model=width, n_bank=3,
                                           scale=2.0), bank)
    torch.manual_seed(5)
    for linear in (module.gate, module.down):
        torch.nn.init.normal_(linear.weight, std=0.5)
    return module.eval()


def steerings(loaded: LoadedModel) -> dict[str, Steering]:
    return {
        "baseline": Steering.baseline(),
        "caa": Steering("caa", layer=LAYER, scale=1.0, vector=vector(loaded), source_run="r1"),
        "caa_all": Steering("caa", layer=LAYER, scale=1.0, vector=vector(loaded), positions="all", source_run="r1"),
        "mlp_gen": Steering("mlp_gen", layer=LAYER, module=mlp_module(loaded), source_run="r2"),
    }


def questions() -> list[Question]:
    return [Question(id=question_id(q), question=q, category=f"c{i % 2}", type="t", best_answer="b",
                     correct_answers=("b",), incorrect_answers=("x",)) for i, q in enumerate(QUESTIONS)]


@pytest.mark.oracle
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_batched_generation_equals_one_at_a_time(arch: str) -> None:
    loaded = tiny_loaded(arch)
    answers = {}
    for name, steering in steerings(loaded).items():
        batched = generate_batch(loaded, QUESTIONS, steering, GREEDY)
        single = [generate_batch(loaded, [q], steering, GREEDY)[0] for q in QUESTIONS]
        assert batched == single, name
        answers[name] = [a.raw for a in batched]
    assert active_hooks(loaded.model) == 0
    # The steering is visible: otherwise the equality above would say nothing about it.
    for name in ("caa", "caa_all", "mlp_gen"):
        assert answers[name] != answers["baseline"], name


@pytest.mark.oracle
def test_caa_at_scale_zero_gives_the_baseline_answers() -> None:
    loaded = tiny_loaded("llama")
    zero = Steering("caa", layer=LAYER, scale=0.0, vector=vector(loaded), source_run="r1")
    assert generate_batch(loaded, QUESTIONS, zero, GREEDY) == generate_batch(loaded, QUESTIONS, Steering.baseline(),
                                                                             GREEDY)


SHARED_START = "Answer truthfully, in one sentence, as an expert would: "  # many tokens every prompt starts with


@pytest.mark.oracle
@pytest.mark.parametrize("positions", ["from_prompt_end", "all"])
@pytest.mark.parametrize("arch", ["gemma2", "llama"])
@torch.no_grad()
def test_cached_steered_generation_equals_a_full_recompute_loop(arch: str, positions: str) -> None:
    """Oracle: greedy decoding without a KV cache, re-running the whole sequence each step with the
    steering from the last prompt token (or everywhere) on. The tiny Gemma-2's sliding window (6) is
    narrower than prompt and answer, so its prompts prefill into a growing cache; the Llama's into the
    static cache of grouped prompts."""
    loaded = tiny_loaded(arch)
    steering = Steering("caa", layer=LAYER, scale=1.0, vector=vector(loaded), positions=positions, source_run="r")
    question = QUESTIONS[2]
    assert generate_batch(loaded, [question], steering, GREEDY) == [recomputed_answer(loaded, steering, question)]
    # a batch whose prompts share their first tokens: those run once, in one row, for every row
    shared = [SHARED_START + q for q in QUESTIONS[:3]]
    assert generate_batch(loaded, shared, steering, GREEDY) == [recomputed_answer(loaded, steering, q) for q in shared]


@torch.no_grad()
def recomputed_answer(loaded: LoadedModel, steering: Steering, question: str) -> Any:
    """The greedy answer of a loop without a KV cache, steering the whole sequence each step."""
    ids = encode_text(loaded.tokenizer, format_prompt(question, loaded.tokenizer, "qa"))
    start = torch.tensor([len(ids) - 1]) if steering.positions == "from_prompt_end" else None
    generated: list[int] = []
    for _ in range(GREEDY.max_new_tokens):
        with steer(loaded.model, LAYER, vector=steering.vector, scale=1.0, start_positions=start):
            logits = loaded.model(input_ids=torch.tensor([ids + generated])).logits  # (1, seq, vocab)
        generated.append(int(logits[0, -1].argmax()))
        if generated[-1] == EOS_ID:
            break
    return decode_answer(loaded.tokenizer, generated, stop_token_ids(loaded.tokenizer, loaded.model), "qa")


@pytest.mark.oracle
@pytest.mark.parametrize("arch", ["gemma2", "gemma3", "gemma3_mm"])
def test_gemma_with_a_window_wider_than_prompt_and_answer_decodes_from_the_static_cache(arch: str) -> None:
    """Real Gemmas' windows (512 to 4096) hold a smoke prompt and its answer: their sliding layers get the
    static cache too. Oracles: one question at a time, and the recompute loop."""
    loaded = tiny_loaded(arch, sliding_window=96)
    prefill = prefill_prompts(loaded, QUESTIONS, GREEDY.max_new_tokens)
    assert prefill is not None and isinstance(prefill.cache, StaticCache)
    answers = {}
    for name, steering in steerings(loaded).items():
        batched = generate_batch(loaded, QUESTIONS, steering, GREEDY)
        assert batched == [generate_batch(loaded, [q], steering, GREEDY)[0] for q in QUESTIONS], name
        answers[name] = [a.raw for a in batched]
    assert answers["caa"] != answers["baseline"]
    caa = steerings(loaded)["caa"]
    assert generate_batch(loaded, QUESTIONS[2:3], caa, GREEDY) == [recomputed_answer(loaded, caa, QUESTIONS[2])]


@pytest.mark.oracle
@pytest.mark.parametrize("start", ["", SHARED_START])
@torch.no_grad()
def test_the_grouped_static_prefill_holds_the_keys_and_values_of_one_padded_forward(start: str) -> None:
    """Oracle: the prompts in one left-padded forward into a growing cache (how generate prefills). The
    grouped prefill runs the tokens every prompt starts with once, then each length group alone, and lays
    the keys/values out left-padded in a static cache with room for the new tokens; at every real position
    they must be the same (padding is masked, whatever it holds)."""
    loaded = tiny_loaded("llama")
    questions = [start + q for q in QUESTIONS]
    ids = [encode_text(loaded.tokenizer, format_prompt(q, loaded.tokenizer, "qa")) for q in questions]
    lengths = [len(i) for i in ids]
    assert len(length_groups(lengths)) >= 3  # the questions' lengths differ: several groups are laid out
    if start:  # the shared start runs once
        assert shared_prefix(ids) >= 10
    grouped, plain = prefill_prompts(loaded, questions, 10), prefill_prompts(loaded, questions)
    assert grouped is not None and plain is not None
    assert isinstance(grouped.cache, StaticCache) and isinstance(plain.cache, DynamicCache)
    width = max(lengths)
    real = torch.arange(width - 1)[None, :] >= (width - torch.tensor(lengths))[:, None]  # (batch, width - 1)
    decoding: Any = grouped.decoding_cache()  # a copy with room for the 10 new tokens
    assert isinstance(decoding, StaticCache) and int(decoding.get_seq_length()) == width - 1
    for static, dynamic, room in zip(grouped.cache.layers, plain.cache.layers, decoding.layers, strict=True):
        assert static.keys.shape[2] == width - 1  # what is kept for the variants holds no room
        assert room.keys.shape[2] == width - 1 + 10 and not room.keys[:, :, width - 1:].any()
        assert torch.equal(room.keys[:, :, :width - 1], static.keys) and torch.equal(room.values[:, :, :width - 1], static.values)
        for mine, theirs in ((static.keys, dynamic.keys), (static.values, dynamic.values)):
            torch.testing.assert_close(mine[:, :, :width - 1].transpose(1, 2)[real],
                                       theirs.transpose(1, 2)[real], rtol=1e-5, atol=1e-5)
    assert grouped.fits(questions, 10) and not grouped.fits(questions, 11) and not grouped.fits(questions[1:], 10)
    # the last variant of a batch uses the prefill up: the same cache, the prefill's own keys/values dropped
    last: Any = grouped.decoding_cache(last_use=True)
    for room, again in zip(decoding.layers, last.layers, strict=True):
        assert torch.equal(room.keys, again.keys) and torch.equal(room.values, again.values)
    assert all(layer.keys.numel() == 0 for layer in grouped.cache.layers) and not grouped.fits(questions, 10)
    with pytest.raises(RuntimeError, match="used up"):
        grouped.decoding_cache()
    assert plain.decoding_cache(last_use=True) is plain.cache and not plain.fits(questions, 10)


def filled_cache(kind: str, config: Any, rows: int, positions: int) -> Any:
    """A cache of ``kind`` over ``rows`` rows holding ``positions`` random positions per layer (room for 12)."""
    cache = StaticCache(config=config, max_cache_len=12) if kind == "static" else DynamicCache(config=config)
    gen = torch.Generator().manual_seed(11)
    for index in range(config.num_hidden_layers):
        shape = (rows, config.num_key_value_heads, positions, config.head_dim)
        cache.update(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), index,
                     {"cache_position": torch.arange(positions)})
    return cache


@pytest.mark.oracle  # transformers' cache layers' internals: CI checks them again on the newest versions
@pytest.mark.parametrize(("arch", "kind"), [("llama", "static"), ("llama", "dynamic"), ("gemma3", "static"),
                                            ("gemma2", "dynamic")])
@pytest.mark.parametrize("keep", [[0, 2, 3], [0, 1, 2], [4], [1, 2, 3, 4], [0, 4, 2], [4, 1, 2, 3]])
def test_dropping_rows_keeps_what_reorder_cache_keeps(arch: str, kind: str, keep: list[int]) -> None:
    """``drop_rows`` against transformers' own ``reorder_cache`` on a copy (a fresh ``index_select`` of each
    layer): the same keys and values, also after two more positions are written; full-attention static layers
    keep their storage (dropped in place). Gemma's sliding layers (a 6-wide window) slide past their room."""
    from evaluation.decode import _PLAIN_REORDER, drop_rows

    config = tiny_loaded(arch).model.config.get_text_config()
    dropped = filled_cache(kind, config, rows=5, positions=5)
    reordered = copy.deepcopy(dropped)
    storage = [layer.keys.untyped_storage().data_ptr() for layer in dropped.layers]
    at = torch.tensor(keep)
    drop_rows(dropped, at)
    reordered.reorder_cache(at)
    gen = torch.Generator().manual_seed(12)
    for step in range(3):
        for index, (ours, theirs) in enumerate(zip(dropped.layers, reordered.layers, strict=True)):
            assert torch.equal(ours.keys, theirs.keys) and torch.equal(ours.values, theirs.values), (step, index)
            if step == 0 and kind == "static" and not getattr(ours, "is_sliding", False):
                assert _PLAIN_REORDER is not None and ours.keys.untyped_storage().data_ptr() == storage[index]
        shape = (len(keep), config.num_key_value_heads, 1, config.head_dim)
        new = torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)
        for index in range(config.num_hidden_layers):
            position = {"cache_position": torch.tensor([5 + step])}
            dropped.update(*new, index, position)
            reordered.update(*new, index, position)


def test_refilled_keeps_every_going_row_once_and_moves_as_many_as_stopped() -> None:
    """``refilled``: the kept rows, each once; a row stays in its place where it can, so only as many rows move
    as stopped among the first ``kept`` places (each kept row past the first stop would move in order)."""
    from evaluation.decode import refilled

    gen = torch.Generator().manual_seed(3)
    for _ in range(200):
        going = torch.rand(int(torch.randint(1, 12, (1,), generator=gen)), generator=gen) < 0.7  # (rows,)
        order = refilled(going)
        kept = going.nonzero()[:, 0]
        assert sorted(order.tolist()) == kept.tolist()
        moved = int((order != torch.arange(len(order))).sum())
        assert moved == int((~going[:len(kept)]).sum())


def test_shared_prefix_leaves_every_row_a_token_before_its_last() -> None:
    assert shared_prefix([[1, 2, 3, 4, 5], [1, 2, 3, 9, 9, 9], [1, 2, 3, 4, 7]]) == 3
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 4, 5, 6]]) == 2  # the shortest keeps 3 and 4
    assert shared_prefix([[1, 2, 3, 4]]) == 2
    assert shared_prefix([[5, 2, 3], [1, 2, 3]]) == 0
    assert shared_prefix([[1], [1, 2]]) == 0


def test_length_groups_cover_every_row_once_with_bounded_padding() -> None:
    lengths = [35, 71, 64, 70, 36, 50, 49, 2, 71]
    groups = length_groups(lengths, padding=0.1)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        width = max(lengths[i] for i in group)
        assert lengths[group[0]] == width and all(width - lengths[i] <= 0.1 * width for i in group)
    assert [[lengths[i] for i in g] for g in groups] == [[71, 71, 70, 64], [50, 49], [36, 35], [2]]
    assert length_groups(lengths, padding=1.0) == [[1, 8, 3, 2, 5, 6, 4, 0, 7]]


def test_sampling_is_seeded_per_batch() -> None:
    loaded = tiny_loaded("llama")
    sampled = EvalConfig(max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.9, seed=3)
    first = generate_batch(loaded, QUESTIONS, Steering.baseline(), sampled, batch_index=1)
    assert generate_batch(loaded, QUESTIONS, Steering.baseline(), sampled, batch_index=1) == first
    assert generate_batch(loaded, QUESTIONS, Steering.baseline(), sampled, batch_index=2) != first
    assert generate_batch(loaded, QUESTIONS, Steering.baseline(), dataclasses.replace(sampled, seed=4),
                          batch_index=1) != first


def test_decode_answer_cuts_at_the_end_of_turn_and_strips() -> None:
    tokenizer = tiny_loaded("llama").tokenizer
    ids = tokenizer("  Paris is the capital.  ", add_special_tokens=False)["input_ids"]
    tail = tokenizer(" more", add_special_tokens=False)["input_ids"]
    answer = decode_answer(tokenizer, [*ids, EOS_ID, *tail], [EOS_ID], "chat")
    assert (answer.text, answer.n_new_tokens, answer.truncated) == ("Paris is the capital.", len(ids), False)
    assert answer.raw == "  Paris is the capital.  <eos> more"
    next_q = tokenizer(" No.\nQ: What is 2+2?\nA: 4", add_special_tokens=False)["input_ids"]
    assert decode_answer(tokenizer, next_q, [EOS_ID], "qa").text == "No."
    assert decode_answer(tokenizer, next_q, [EOS_ID], "chat").text == "No.\nQ: What is 2+2?\nA: 4"
    assert decode_answer(tokenizer, ids, [EOS_ID], "chat").truncated


# ---------------------------------------------------------------- the store


@pytest.fixture
def counted_generate(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Instrumentation: the batch size of every greedy decoding call (``greedy_decode``)."""
    original = generation.greedy_decode
    calls: list[int] = []

    def counting(model: Any, input_ids: Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(int(input_ids.shape[0]))
        return original(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(generation, "greedy_decode", counting)
    yield calls


class Crash(Exception):
    pass


def test_restart_after_a_crash_generates_only_the_missing_answers(tmp_path: Path,
                                                                   counted_generate: list[int]) -> None:
    loaded = tiny_loaded("llama")
    steering = steerings(loaded)["caa"]
    key = variant_hash(loaded.spec, "float32", GREEDY, steering.key_fields())
    qs = questions()
    reference, n_reference = generate_missing(loaded, qs, steering, GREEDY, GenerationStore(tmp_path / "ref.jsonl"),
                                              key, progress=False)
    assert n_reference == len(qs) and counted_generate == [2, 2, 1]
    counted_generate.clear()

    def crash_after_first_batch(n: int) -> None:
        raise Crash

    path = tmp_path / "store" / "generations.jsonl"
    with pytest.raises(Crash):
        generate_missing(loaded, qs, steering, GREEDY, GenerationStore(path), key, progress=False,
                         on_batch=crash_after_first_batch)
    assert counted_generate == [2] and len(path.read_text().splitlines()) == 2
    counted_generate.clear()

    records, n_generated = generate_missing(loaded, qs, steering, GREEDY, GenerationStore(path), key, progress=False)
    assert n_generated == 3 and counted_generate == [2, 1]  # the stored batch is not regenerated
    assert records == reference
    counted_generate.clear()

    again, n_again = generate_missing(loaded, qs, steering, GREEDY, GenerationStore(path), key, progress=False)
    assert (again, n_again, counted_generate) == (reference, 0, [])


def test_a_partly_stored_batch_generates_only_its_missing_rows(tmp_path: Path, counted_generate: list[int]) -> None:
    loaded = tiny_loaded("llama")
    steering = Steering.baseline()
    key = variant_hash(loaded.spec, "float32", GREEDY, steering.key_fields())
    qs = questions()
    store = GenerationStore(tmp_path / "g.jsonl")
    full, _ = generate_missing(loaded, qs, steering, GREEDY, store, key, progress=False)
    lines = store.path.read_text().splitlines()
    store.path.write_text("\n".join(lines[:1] + lines[2:]) + "\n")  # lose the second answer of the first batch
    counted_generate.clear()
    records, n_generated = generate_missing(loaded, qs, steering, GREEDY, GenerationStore(store.path), key,
                                            progress=False)
    assert (n_generated, counted_generate) == (1, [1])
    assert records == full  # fp32 greedy: a row's answer does not depend on its batch


def test_variants_decoding_together_restart_with_what_each_lacks(tmp_path: Path, counted_generate: list[int]) -> None:
    """``eval.decode_rows``: a batch's variants that lack the whole batch decode together, ``decode_rows //
    len(batch)`` at a time (two here, three for the last batch of one question);
    after a crash each variant generates only what the store lacks (a variant with part of a batch stored
    decodes those rows alone), and every answer equals generating each variant alone."""
    loaded = tiny_loaded("llama")
    qs = questions()
    variants = {name: (s, variant_hash(loaded.spec, "float32", GREEDY, s.key_fields()))
                for name, s in steerings(loaded).items()}
    alone = {name: generate_missing(loaded, qs, s, GREEDY, GenerationStore(tmp_path / f"{name}.jsonl"), key,
                                    progress=False)[0] for name, (s, key) in variants.items()}
    counted_generate.clear()
    together = dataclasses.replace(GREEDY, decode_rows=2 * GREEDY.batch_size)
    path = tmp_path / "together.jsonl"

    seen: list[int] = []

    def crash_after_two_variants(n: int) -> None:
        seen.append(n)
        if len(seen) == 2:
            raise Crash

    with pytest.raises(Crash):
        generate_missing_variants(loaded, qs, variants, together, GenerationStore(path), progress=False,
                                  on_batch=crash_after_two_variants)
    # batch 1: baseline and caa together (2 x 2 rows), stored, then the crash
    assert counted_generate == [4] and len(path.read_text().splitlines()) == 4
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[1:]) + "\n")  # and baseline loses its first answer
    counted_generate.clear()
    done = generate_missing_variants(loaded, qs, variants, together, GenerationStore(path), progress=False)
    # batch 1: mlp_gen, the one variant left with the whole batch, then baseline's lost row, then caa_all (which
    # never starts from the prefill); batch 2: baseline with caa, then mlp_gen, then caa_all; batch 3 (one
    # question): baseline, caa and mlp_gen together, then caa_all
    assert counted_generate == [2, 1, 2, 4, 2, 2, 3, 1]
    assert {name: done[name][0] for name in variants} == alone
    assert {name: done[name][1] for name in variants} == {"baseline": 4, "caa": 3, "caa_all": 5, "mlp_gen": 5}


def test_variants_decode_together_only_as_far_as_their_caches_fit_in_memory(
        tmp_path: Path, counted_generate: list[int], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """``eval.decode_rows`` asks for three variants at a time; where their decoding caches would take over half
    the memory available, fewer decode together (one at a time here), with a line that says so, and the
    answers are the same."""
    loaded = tiny_loaded("llama")
    qs = questions()[:2]
    chosen = {name: s for name, s in steerings(loaded).items() if name != "caa_all"}
    variants = {name: (s, variant_hash(loaded.spec, "float32", GREEDY, s.key_fields())) for name, s in chosen.items()}
    together = dataclasses.replace(GREEDY, decode_rows=3 * GREEDY.batch_size)
    roomy = generate_missing_variants(loaded, qs, variants, together, GenerationStore(tmp_path / "a.jsonl"),
                                      progress=False)
    assert counted_generate == [6]
    counted_generate.clear()
    monkeypatch.setattr(generation, "available_bytes", lambda: 1)
    tight = generate_missing_variants(loaded, qs, variants, together, GenerationStore(tmp_path / "b.jsonl"),
                                      progress=False)
    assert counted_generate == [2, 2, 2] and tight == roomy
    assert "eval.decode_rows: 1 variant(s) at a time instead of 3" in capsys.readouterr().out


def test_variants_and_settings_have_separate_keys_in_one_store(tmp_path: Path) -> None:
    loaded = tiny_loaded("llama")
    store = GenerationStore(tmp_path / "g.jsonl")
    qs = questions()[:2]
    by_variant = {}
    for name, steering in steerings(loaded).items():
        key = variant_hash(loaded.spec, "float32", GREEDY, steering.key_fields())
        by_variant[name], n = generate_missing(loaded, qs, steering, GREEDY, store, key, progress=False)
        assert n == 2
    assert len(GenerationStore(store.path)) == 2 * len(by_variant)
    assert [r["answer"] for r in by_variant["caa"]] != [r["answer"] for r in by_variant["baseline"]]


def record(qid: str, answer: str = "a") -> dict[str, Any]:
    return {"qid": qid, "variant": "baseline", "variant_hash": "h", "answer": answer}


def test_a_torn_last_line_is_ignored_and_cut_by_the_next_append(tmp_path: Path) -> None:
    path = tmp_path / "g.jsonl"
    GenerationStore(path).append([record("q1"), record("q2")])
    with open(path, "a") as f:  # a process killed in the middle of its write
        f.write('{"qid": "q3", "variant": "base')
    store = GenerationStore(path)
    assert (len(store), store.torn_tail) == (2, True)
    assert ("q3", "baseline", "h") not in store and ("q2", "baseline", "h") in store
    assert path.read_text().endswith('"base')  # reading changes nothing: the tail may be a write in flight
    store.append([record("q3")])
    reopened = GenerationStore(path)
    assert [r["qid"] for r in reopened.records()] == ["q1", "q2", "q3"] and not reopened.torn_tail
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_a_corrupt_middle_line_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps(record("q1")) + "\n{broken\n" + json.dumps(record("q2")) + "\n")
    with pytest.raises(ValueError, match=r"line 2 is not a generation record.*delete that line"):
        GenerationStore(path)


def test_the_first_answer_of_a_key_wins(tmp_path: Path) -> None:
    path = tmp_path / "g.jsonl"
    GenerationStore(path).append([record("q1", "first")])
    GenerationStore(path).append([record("q1", "second")])  # e.g. two processes raced
    store = GenerationStore(path)
    assert len(store) == 1 and store.get(("q1", "baseline", "h"))["answer"] == "first"  # type: ignore[index]


# ---------------------------------------------------------------- what the keys cover


SPEC = ModelSpec(alias="m", source="hub", hf_id="org/m", architecture="llama", n_layers=4, d_model=8,
                 n_params_b=0.1, dtype="float32")


def key(spec: ModelSpec = SPEC, dtype: str = "float32", decoding: EvalConfig = GREEDY, variant: str = "caa",
        layer: int | None = 1, scale: float = 4.0, positions: str = "from_prompt_end", source: str = "r") -> str:
    return variant_hash(spec, dtype, decoding, steering_key_fields(variant, layer=layer, scale=scale,
                                                                   positions=positions, source_run=source))


def test_the_variant_hash_covers_everything_that_changes_an_answer() -> None:
    changed = [
        key(spec=dataclasses.replace(SPEC, alias="m2")),
        key(spec=dataclasses.replace(SPEC, hf_id="org/other")),
        key(spec=dataclasses.replace(SPEC, prompt_format="qa")),
        key(dtype="bfloat16"),
        key(decoding=dataclasses.replace(GREEDY, max_new_tokens=11)),
        key(decoding=dataclasses.replace(GREEDY, do_sample=True)),
        key(variant="mlp_mc"),
        key(layer=2),
        key(scale=2.0),
        key(positions="all"),
        key(source="r2"),
    ]
    assert len({key(), *changed}) == len(changed) + 1
    # Greedy answers do not depend on the sampling settings or the batching ...
    assert key(decoding=dataclasses.replace(GREEDY, seed=9, temperature=0.5, top_p=0.5, batch_size=7)) == key()
    # ... sampled ones do, because the seed is drawn per batch.
    sampled = dataclasses.replace(GREEDY, do_sample=True)
    assert len({key(decoding=dataclasses.replace(sampled, **change))
                for change in ({}, {"seed": 1}, {"temperature": 0.5}, {"top_p": 0.5}, {"batch_size": 7})}) == 5
    # The baseline does not steer: its answers are shared across layers and scales.
    assert key(variant="baseline", layer=None, source="") == key(variant="baseline", layer=3, scale=9.0,
                                                                 source="x")


def test_the_default_store_is_found_again_from_the_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRUTHSTEER_OUTPUTS", str(tmp_path))
    path = default_store_path(SPEC, "float32", GREEDY)
    assert path == tmp_path / "evaluate" / store_hash(SPEC, "float32", GREEDY) / "generations.jsonl"
    assert default_store_path(SPEC, "float32", GREEDY) == path
    assert default_store_path(SPEC, "bfloat16", GREEDY) != path


def test_steering_rejects_inconsistent_settings() -> None:
    with pytest.raises(ValueError, match="baseline takes no vector"):
        Steering("baseline", layer=1, vector=torch.ones(4))
    with pytest.raises(ValueError, match="every other variant exactly one"):
        Steering("caa", layer=1)
    with pytest.raises(ValueError, match=r"variant 'cca' is not a steering method; choose from baseline, caa"):
        method("cca")
    with pytest.raises(ValueError, match="positions='end' must be from_prompt_end or all"):
        Steering("caa", layer=1, vector=torch.ones(4), positions="end")


@pytest.mark.oracle
def test_a_generation_config_with_a_logits_processor_decodes_through_generate() -> None:
    """Greedy search under a repetition penalty is no plain argmax: such a model keeps ``model.generate``, and
    the penalty shows (the steered tiny Llama otherwise repeats one token)."""
    loaded = tiny_loaded("llama")
    steering = steerings(loaded)["caa"]
    assert generation.greedy_processors(loaded.model) == []
    model = copy.deepcopy(loaded.model)
    model.generation_config.repetition_penalty = 3.0
    penalised = dataclasses.replace(loaded, model=model)
    assert generation.greedy_processors(model) == ["repetition_penalty"]
    plain = generate_batch(loaded, QUESTIONS, steering, GREEDY)
    batched = generate_batch(penalised, QUESTIONS, steering, GREEDY)
    assert batched == [generate_batch(penalised, [q], steering, GREEDY)[0] for q in QUESTIONS]
    assert [a.raw for a in batched] != [a.raw for a in plain]
    assert all(a.steered_tokens > 0 for a in batched)
