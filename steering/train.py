"""Training an `MLPSteering` module per branch at the steering layer of the frozen model (the maths;
``stages.train`` is the stage that logs it).

Branches (``mlp.branch``):
  - ``mc``: for each question, the best answer against one incorrect answer (chosen by a seed and the
    question id): hinge loss ``relu(margin - (logp(correct) - logp(incorrect)))``, logp being the
    sum of the answer tokens' log-probabilities;
  - ``gen``: mean negative log-likelihood of the best answer's tokens;
  - ``both``: one module per branch, each trained in a child run of the stage run;
  - ``joint``: one module on ``mc_weight x (mean mc hinge) + gen_weight x (mean gen NLL)``, both means over
    the same questions (the batch's, or the whole split's); ``JointScorer``.

The model never trains: its parameters are frozen (``requires_grad=False``) and only the module's
receive gradients. Steering follows ``steering.positions``: ``from_prompt_end`` steers from the last
prompt token on (the one predicting the first answer token), ``all`` steers every position.

Two speedups make a step cheap; both are exact (tests compare them with the straightforward path),
and a self-check on the first batch falls back to the full forward, with a logged reason, for an
architecture where they would not be:
  1. prefix cache: the model is frozen and steering acts from the last prompt token on, so the
     output of layer L and the keys/values of the tokens before the last prompt token never change.
     ``steering.prefix.PrefixCache`` computes them once per split; a step runs layers L+1.. over the last prompt
     token and the answer only (``suffix_answer_logprobs``, via ``resume_after_layer``);
  2. answer-only head: the LM head (and the final logit soft-capping of Gemma) is applied only to
     the hidden states that predict answer tokens (``steering.logprobs.answer_head_logprobs``).

Logs per step ``train_loss`` (the batch's loss) and ``val_loss`` (the whole val split, after the
step), ``initial_*``/``final_*`` train and val losses over the whole splits, ``seconds_per_step``;
tags ``truthsteer.fast_path`` (``on`` or why not); artifacts ``mlp/<branch>/mlp.safetensors`` and
``mlp/<branch>/mlp.json`` (the module's config, the branch and the resolved run config).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Mapping, Sequence

import mlflow
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from core.artifacts import TAG_FAST_PATH
from core.config import ConfigError, MLPConfig
from steering.hooks import check_steered
from steering.logprobs import branch_loss, steered_answer_logprobs
from steering.mlp import BRANCHES, LOSS_BRANCHES, MLPSteering
from steering.prefix import PrefixCache, suffix_answer_logprobs
from steering.sequences import Sequences, make_batch

log = logging.getLogger(__name__)

# Largest per-token log-prob difference between the fast and the full path that the first-batch
# self-check accepts. A structural mismatch (a wrong mask, a skipped layer) is far larger.
FAST_PATH_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.25, torch.float16: 0.25}


# ------------------------------------------------------------------------------------------- training


@dataclasses.dataclass
class SplitScorer:
    """Scores examples of one split under steering, by the fast or the straightforward path.

    Args:
        model: the frozen model.
        module: the steering module.
        seqs: the split's sequences.
        pad_id: the tokenizer's pad token id.
        positions: ``from_prompt_end`` or ``all``.
        cache: the split's prefix cache (the fast path), or None for full forwards.
        answer_only_head: apply the LM head only to answer-predicting states.
    """

    model: nn.Module
    module: MLPSteering
    seqs: Sequences
    pad_id: int
    positions: str
    cache: PrefixCache | None = None
    answer_only_head: bool = True

    def logprobs(self, examples: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Answer-token log-probs of ``examples`` and the ``(batch, seq)`` answer mask they follow."""
        indices = self.seqs.sequence_indices(examples)
        if self.cache is not None:
            suffix = self.cache.batch(indices)
            token_logp, count = suffix_answer_logprobs(self.model, suffix, lambda: self.module.steering(self.model),
                                                       answer_only_head=self.answer_only_head)
            check_steered(count, suffix.input_ids.numel(), f"prefix-cached forward of {len(indices)} sequences")
            return token_logp, suffix.answer_mask
        device = next(self.model.parameters()).device
        batch = make_batch(self.seqs, indices, self.pad_id).to(device)
        token_logp = steered_answer_logprobs(self.model, self.module, batch, positions=self.positions,
                                             answer_only_head=self.answer_only_head)
        return token_logp, batch.answer_mask

    def loss(self, examples: Sequence[int], branch: str, margin: float) -> tuple[Tensor, int]:
        token_logp, answer_mask = self.logprobs(examples)
        return branch_loss(branch, token_logp, answer_mask, margin)

    def width(self, example: int) -> int:
        """The padded width ``example`` needs: its longest sequence (its longest suffix with a cache)."""
        return max(len(self.seqs.token_ids[i]) - (self.cache.splits[i] if self.cache is not None else 0)
                   for i in self.seqs.sequence_indices([example]))

    @torch.no_grad()
    def mean_loss(self, branch: str, margin: float, examples_per_chunk: int) -> float:
        """The loss over the whole split, in chunks of examples of similar width (losses are sums,
        so any chunking gives the same mean; similar widths waste little on padding)."""
        order = sorted(range(self.seqs.n_examples), key=self.width)
        total, count = 0.0, 0
        for start in range(0, len(order), examples_per_chunk):
            chunk = order[start:start + examples_per_chunk]
            loss_sum, n = self.loss(chunk, branch, margin)
            total, count = total + float(loss_sum), count + n
        return total / count if count else math.nan


@dataclasses.dataclass
class JointScorer:
    """The joint branch's loss over one split: ``weights[b] x`` branch ``b``'s mean loss, summed.

    ``scorers`` score the same questions in the same order (example i of each is question i), so a batch
    of examples is a batch of questions for every branch.

    Args:
        scorers: a ``SplitScorer`` per loss branch (``mc``, ``gen``).
        weights: each branch's weight (``mlp.mc_weight``, ``mlp.gen_weight``).
        eval_batch_size: sequences per no-grad forward in ``mean_loss``.
    """

    scorers: Mapping[str, SplitScorer]
    weights: Mapping[str, float]
    eval_batch_size: int

    def loss(self, examples: Sequence[int], branch: str, margin: float) -> tuple[Tensor, int]:
        """The batch's weighted sum of means, as ``(loss, 1)`` (``branch`` is ``joint``)."""
        total: Tensor | float = 0.0
        for name, scorer in self.scorers.items():
            loss_sum, count = scorer.loss(examples, name, margin)
            total = total + self.weights[name] * loss_sum / count
        return torch.as_tensor(total), 1

    def mean_loss(self, branch: str, margin: float, examples_per_chunk: int) -> float:
        """The weighted sum of each branch's mean loss over the whole split."""
        return sum(self.weights[name] * scorer.mean_loss(name, margin, max(1, self.eval_batch_size // scorer.seqs.per_example))
                   for name, scorer in self.scorers.items())


def subset(seqs: Sequences, examples: Sequence[int]) -> Sequences:
    """The sequences of ``examples`` only, as a split of their own."""
    indices = seqs.sequence_indices(examples)
    return Sequences(tuple(seqs.token_ids[i] for i in indices), tuple(seqs.n_answer[i] for i in indices),
                     seqs.per_example)


def fast_path_mismatch(model: nn.Module, module: MLPSteering, seqs: Sequences, pad_id: int, positions: str,
                       cache: PrefixCache | None = None) -> str:
    """Why the fast path (prefix cache and answer-only head) cannot be trusted on ``model``, or "".

    Scores every sequence of ``seqs`` both ways and compares the answer-token log-probs; an
    exception or a difference above ``FAST_PATH_TOLERANCE`` is a reason. The cache is built for
    exactly ``seqs`` in one batch, so only the structure of the shortcut is compared, not the
    rounding of another batching (which bf16 makes visible and which is no error).

    Args:
        model: the frozen model.
        module: the steering module.
        seqs: a few sequences (two examples of the first training batch: their rows pad differently).
        pad_id: the tokenizer's pad token id.
        positions: ``from_prompt_end`` or ``all``.
        cache: the prefix cache of ``seqs``; None builds it.
    """
    device = next(model.parameters()).device
    indices = list(range(len(seqs.token_ids)))
    with torch.no_grad():
        try:
            if cache is None:
                cache = PrefixCache.build(model, module.config.layer, seqs, pad_id, len(indices), positions)
            fast, _ = suffix_answer_logprobs(model, cache.batch(indices), lambda: module.steering(model))
        except Exception as err:  # any failure of the shortcut means: use the full forward
            return f"the fast path raised {type(err).__name__}: {err}"
        batch = make_batch(seqs, indices, pad_id).to(device)
        full = steered_answer_logprobs(model, module, batch, positions=positions, answer_only_head=False)
    tolerance = FAST_PATH_TOLERANCE.get(next(model.parameters()).dtype, 0.25)
    diff = float((fast - full).abs().max()) if fast.shape == full.shape else math.inf
    if not diff <= tolerance:
        return f"fast-path log-probs differ from the full forward's by up to {diff:.3g} (> {tolerance:g})"
    return ""


def _optimizer(params: Sequence[nn.Parameter], cfg: MLPConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ConfigError(f"mlp.optimizer={cfg.optimizer!r} is not one of adamw, adam, sgd")


def batch_order(n_examples: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """The examples of each step: seeded permutations of the split, concatenated and cut into batches.

    Args:
        n_examples: examples in the train split (>= 1).
        batch_size: examples per step.
        steps: number of steps.
        seed: seeds the permutations.
    """
    if n_examples < 1:
        raise ValueError(f"n_examples={n_examples}: training needs at least one example")
    generator = torch.Generator().manual_seed(seed)
    stream: list[int] = []
    while len(stream) < batch_size * steps:
        stream += torch.randperm(n_examples, generator=generator).tolist()
    return [stream[s * batch_size:(s + 1) * batch_size] for s in range(steps)]


def _parts(seqs: Sequences | Mapping[str, Sequences], branch: str) -> dict[str, Sequences]:
    """The sequences of each loss branch ``branch`` trains on: ``{branch: seqs}``, or the joint branch's mapping."""
    if branch != "joint":
        if not isinstance(seqs, Sequences):
            raise ValueError(f"branch {branch!r} trains on one Sequences, not {sorted(seqs)}")
        return {branch: seqs}
    if isinstance(seqs, Sequences) or set(seqs) != set(LOSS_BRANCHES):
        raise ValueError(f"the joint branch trains on a mapping with {', '.join(LOSS_BRANCHES)} sequences")
    return {name: seqs[name] for name in LOSS_BRANCHES}


@dataclasses.dataclass
class BranchResult:
    """What training one branch produced; losses are means over the batch or the whole split."""

    module: MLPSteering
    train_losses: list[float]
    val_losses: list[float]
    initial_train_loss: float
    initial_val_loss: float
    final_train_loss: float
    final_val_loss: float
    fast_path: str  # "on", "off", or "off: <reason>"
    cache_seconds: float
    step_seconds: list[float]


def train_branch(
    model: nn.Module,
    module: MLPSteering,
    train: Sequences | Mapping[str, Sequences],
    val: Sequences | Mapping[str, Sequences],
    *,
    branch: str,
    cfg: MLPConfig,
    positions: str,
    pad_id: int,
    eval_batch_size: int = 16,
    fast_path: bool = True,
    log_metrics: bool = True,
    progress: bool = True,
) -> BranchResult:
    """Train ``module`` in place on ``train`` for ``cfg.steps`` steps; ``model`` is frozen first.

    Each step takes the next ``cfg.batch_size`` examples of seeded permutations of ``train``,
    minimises the branch loss with the optimizer of ``cfg`` and then scores the whole ``val`` split.

    Args:
        model: the causal LM; its parameters are set to ``requires_grad=False`` and never change.
        module: the steering module (fp32); moved to the model's device.
        train: train sequences of ``branch``; for ``joint``, ``{"mc": ..., "gen": ...}`` of the same questions.
        val: val sequences, as ``train``.
        branch: ``mc``, ``gen`` or ``joint``.
        cfg: steps, batch size, optimizer, lr, weight decay, margin, seed (and the joint branch's weights).
        positions: ``from_prompt_end`` or ``all``.
        pad_id: the tokenizer's pad token id.
        eval_batch_size: sequences per no-grad forward (cache building, split losses).
        fast_path: use the prefix cache and the answer-only head (after the first-batch self-check).
        log_metrics: log ``train_loss``/``val_loss`` per step and the summary metrics to the active run.
        progress: show a tqdm bar.
    """
    if branch not in BRANCHES:
        raise ValueError(f"branch={branch!r} is not one of {', '.join(BRANCHES)}")
    parts = {"train": _parts(train, branch), "val": _parts(val, branch)}
    n_examples = {split: {seqs.n_examples for seqs in by_branch.values()} for split, by_branch in parts.items()}
    if any(len(counts) != 1 for counts in n_examples.values()):
        raise ValueError(f"the joint branch needs the same questions in mc and gen: examples {n_examples}")
    n_train, n_val = min(n_examples["train"]), min(n_examples["val"])
    if n_train == 0 or n_val == 0:
        raise ConfigError(
            f"train has {n_train} and val {n_val} questions; both need at least one "
            "(set data.train and data.val, e.g. --overrides data.train=16,data.val=8)"
        )
    model.eval().requires_grad_(False)
    module.to(next(model.parameters()).device).train()
    torch.manual_seed(cfg.seed)
    batches = batch_order(n_train, cfg.batch_size, cfg.steps, cfg.seed)
    chunk = max(1, eval_batch_size // (train.per_example if isinstance(train, Sequences) else 1))

    started = time.perf_counter()
    scorers: dict[str, dict[str, SplitScorer]] = {"train": {}, "val": {}}
    reasons = []
    for name, seqs in parts["train"].items():
        scorers["train"][name] = SplitScorer(model, module, seqs, pad_id, positions)
        scorers["val"][name] = SplitScorer(model, module, parts["val"][name], pad_id, positions)
        # two examples of the first batch: padding differs between their rows, which is enough
        # to expose a structural mismatch, at a fraction of a full batch's cost
        reason = fast_path_mismatch(model, module, subset(seqs, batches[0][:2]), pad_id, positions) if fast_path else ""
        reasons.append(reason)
    path = "off"
    if fast_path:
        reason = next((r for r in reasons if r), "")
        if reason:
            log.warning("training %s without the prefix cache and answer-only head: %s", branch, reason)
            path = f"off: {reason}"
        else:
            for by_branch in scorers.values():
                for name, scorer in by_branch.items():
                    cache = PrefixCache.build(model, module.config.layer, scorer.seqs, pad_id, eval_batch_size, positions)
                    by_branch[name] = dataclasses.replace(scorer, cache=cache, answer_only_head=True)
            path = "on"
    cache_seconds = time.perf_counter() - started
    train_scorer: SplitScorer | JointScorer
    val_scorer: SplitScorer | JointScorer
    if branch == "joint":
        weights = {"mc": cfg.mc_weight, "gen": cfg.gen_weight}
        train_scorer = JointScorer(scorers["train"], weights, eval_batch_size)
        val_scorer = JointScorer(scorers["val"], weights, eval_batch_size)
    else:
        train_scorer, val_scorer = scorers["train"][branch], scorers["val"][branch]

    initial_train = train_scorer.mean_loss(branch, cfg.margin, chunk)
    initial_val = val_scorer.mean_loss(branch, cfg.margin, chunk)
    optimizer = _optimizer(list(module.parameters()), cfg)
    train_losses: list[float] = []
    val_losses: list[float] = []
    step_seconds: list[float] = []
    bar = tqdm(batches, desc=f"train {branch}", disable=not progress)
    for step, examples in enumerate(bar, start=1):
        tick = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_sum, count = train_scorer.loss(examples, branch, cfg.margin)
        loss = loss_sum / count
        loss.backward()
        optimizer.step()
        step_seconds.append(time.perf_counter() - tick)
        train_losses.append(float(loss.detach()))
        val_losses.append(val_scorer.mean_loss(branch, cfg.margin, chunk))
        bar.set_postfix(train_loss=f"{train_losses[-1]:.4f}", val_loss=f"{val_losses[-1]:.4f}")
        if log_metrics:
            mlflow.log_metrics({"train_loss": train_losses[-1], "val_loss": val_losses[-1]}, step=step)
    module.eval()
    result = BranchResult(
        module=module,
        train_losses=train_losses,
        val_losses=val_losses,
        initial_train_loss=initial_train,
        initial_val_loss=initial_val,
        final_train_loss=train_scorer.mean_loss(branch, cfg.margin, chunk),
        final_val_loss=val_losses[-1],
        fast_path=path,
        cache_seconds=cache_seconds,
        step_seconds=step_seconds,
    )
    if log_metrics:
        mlflow.log_metrics({
            "initial_train_loss": result.initial_train_loss, "initial_val_loss": result.initial_val_loss,
            "final_train_loss": result.final_train_loss, "final_val_loss": result.final_val_loss,
            "seconds_per_step": sum(step_seconds) / len(step_seconds), "cache_seconds": cache_seconds,
        })
        mlflow.set_tag(TAG_FAST_PATH, path)
    return result
