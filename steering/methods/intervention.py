"""What a steering method hands to generation and scoring: an intervention.

``Steering`` edits the model inside ``applied(model, prompt_end)``, says how many (row, position)
pairs it must edit (``expected_steered``, which callers compare with the hook's count) and which of
its settings change an answer (``key_fields``, the generation cache's key). This class adds a vector
or a module's output to a decoder layer's output (baseline, caa, mlp_mc, mlp_gen); a method that
edits elsewhere subclasses it and overrides ``payload`` and ``hooked`` (``steering.methods.iti``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

from steering.hooks import SteeredCount, steer
from steering.layers import decoder_layers

# Enters every steered variant's hash. 2: steering reaches every generated token on every transformers
# version; answers stored by earlier code (steered from the prompt's end on 5.24, the first token only)
# are never reused.
STEERING_REVISION = 2


@dataclasses.dataclass(frozen=True, eq=False)
class Steering:
    """How one variant edits the model while it answers: nothing, a vector, or a module.

    Args:
        variant: the method's registered name (``steering.methods``); ``baseline`` edits nothing.
        layer: the decoder layer whose output is steered (None for baseline).
        scale: multiplier of ``vector`` or ``module``'s output at the hook.
        vector: ``(d_model,)`` steering vector, for ``caa``.
        module: an ``nn.Module`` mapping residuals to deltas, for the MLP variants.
        positions: ``from_prompt_end`` (from each row's last prompt token on) or ``all``.
        source_run: the run (or folder) the vector or module came from; it enters the hash.
        relative_scale: what ``scale`` is as a fraction of the layer's mean residual norm (``steering.scale``),
            when the source measured that norm; logged, never part of the hash (``scale`` decides the answers).
    """

    variant: str
    layer: int | None = None
    scale: float = 1.0
    vector: Tensor | None = None
    module: nn.Module | None = None
    positions: str = "from_prompt_end"
    source_run: str = ""
    relative_scale: float | None = None

    def __post_init__(self) -> None:
        if self.positions not in ("from_prompt_end", "all"):
            raise ValueError(f"positions={self.positions!r} must be from_prompt_end or all")
        payload = self.payload()
        if bool(payload) != (self.variant != "baseline"):
            raise ValueError(f"variant {self.variant!r}: baseline takes no vector or module, every other "
                             "variant exactly one")
        if len(payload) > 1:
            raise ValueError(f"variant {self.variant!r}: pass a vector or a module, not both")
        if payload and self.layer is None:
            raise ValueError(f"variant {self.variant!r} needs the layer it steers")

    def payload(self) -> list[Any]:
        """What edits the model: the vector or the module given (none for baseline)."""
        return [x for x in (self.vector, self.module) if x is not None]

    def hooked(self, model: nn.Module, starts: Tensor | None) -> contextlib.AbstractContextManager[SteeredCount]:
        """The hook that edits ``model`` from ``starts`` on (``steering.hooks.steer``)."""
        layer = self.layer if self.layer is not None else -1
        return steer(model, layer, vector=self.vector, module=self.module, scale=self.scale, start_positions=starts)

    @classmethod
    def baseline(cls) -> Steering:
        """The unsteered model."""
        return cls("baseline")

    def key_fields(self) -> dict[str, Any]:
        """What changes an answer (see ``steering_key_fields``)."""
        return steering_key_fields(self.variant, layer=self.layer, scale=self.scale, positions=self.positions,
                                   source_run=self.source_run)

    def start_positions(self, prompt_end: Tensor) -> Tensor | None:
        """``(batch,)`` first steered index per row: the last prompt token, whose output predicts
        the first answer token, so the whole answer is steered; None with ``positions=all``."""
        return prompt_end if self.positions == "from_prompt_end" else None

    def last_unedited_layer(self, n_layers: int) -> int:
        """The highest decoder layer whose output this variant leaves as the unsteered model's at every
        position (-1: it edits inside layer 0). Everything up to it can be computed once for all variants.

        Args:
            n_layers: the model's decoder layers (baseline edits none of them).
        """
        if not self.steers or self.layer is None:  # __post_init__ gives every steering variant a layer
            return n_layers - 1
        return self.layer  # the edit is added to layer ``layer``'s output

    @property
    def steers(self) -> bool:
        """Whether this variant edits the model at all (every variant but baseline)."""
        return self.variant != "baseline"

    @contextlib.contextmanager
    def applied(self, model: nn.Module, prompt_end: Tensor) -> Iterator[SteeredCount]:
        """Steer ``model`` inside the block (nothing for baseline).

        Args:
            model: the model to steer.
            prompt_end: ``(batch,)`` index of each row's last prompt token in the padded input.

        Yields:
            The positions the hook edited (an empty count for baseline), for ``check_steered``.
        """
        if not self.steers:
            yield SteeredCount()
            return
        with self.hooked(model, self.start_positions(prompt_end)) as count:
            yield count

    def expected_steered(self, prompt_end: Tensor, fed: int) -> int:
        """How many (row, position) pairs the hook must edit when each row is fed positions
        ``0 .. fed - 1``: those from the row's start on (all of them with ``positions=all``); 0 for baseline.

        Args:
            prompt_end: ``(batch,)`` index of each row's last prompt token.
            fed: positions each row runs through the layer (prompt and fed-back tokens).
        """
        if not self.steers:
            return 0
        starts = self.start_positions(prompt_end)
        if starts is None:
            return fed * prompt_end.shape[0]
        return int((fed - starts.clamp(max=fed)).sum())


def steering_key_fields(variant: str, *, layer: int | None, scale: float, positions: str,
                        source_run: str) -> dict[str, Any]:
    """The steering settings that change a variant's answers: nothing for baseline; the layer,
    scale, positions and the run the vector or module came from otherwise.

    Args:
        variant: the variant name.
        layer: the steered layer.
        scale: the hook scale (1.0 for MLP modules, whose scale is inside).
        positions: ``from_prompt_end`` or ``all``.
        source_run: the run (or folder) of the vector or module.
    """
    if variant == "baseline":
        return {"variant": "baseline"}
    return {"variant": variant, "layer": layer, "scale": scale, "positions": positions, "source_run": source_run,
            "steering_revision": STEERING_REVISION}


def module_on_layer_device(module: nn.Module, model: nn.Module, layer: int) -> nn.Module:
    """``module`` moved to the device of decoder layer ``layer`` (sharded models keep layers apart).

    Args:
        module: the steering module.
        model: the model it steers.
        layer: the steered decoder layer.
    """
    device = next(decoder_layers(model)[layer].parameters()).device
    return module.to(device)


__all__ = ['STEERING_REVISION', 'Steering', 'module_on_layer_device', 'steering_key_fields']
