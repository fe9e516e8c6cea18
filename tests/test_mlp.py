"""MLPSteering against exact oracles: at init it is CAA (scale * base), its gates mix the bank as
the formula says, and a checkpoint round trip (folder or MLflow run) gives back the same module."""

from __future__ import annotations

import dataclasses
import functools
import json

import mlflow
import pytest
import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from core.artifacts import MLP_DIR, MLP_META, MLP_TENSORS
from steering.hooks import active_hooks, steer
from steering.layers import d_model
from steering.mlp import MLPSteering, MLPSteeringConfig, load_mlp, save_mlp
from tests.tiny_models import TINY_ARCHS, make_tiny

PROMPTS = ["hello world", "hi", "truth is"]


@functools.cache
def tiny(arch: str) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    return make_tiny(arch)


def random_bank(n_bank: int, width: int, norm: float = 8.0, seed: int = 1) -> Tensor:
    bank = torch.randn(n_bank, width, generator=torch.Generator().manual_seed(seed))  # (n_bank, d_model)
    return bank / bank.norm(dim=1, keepdim=True) * norm


def make_module(width: int = 32, n_bank: int = 7, scale: float = 4.0, expansion: int = 2) -> MLPSteering:
    config = MLPSteeringConfig(model="tiny", layer=1, d_model=width, n_bank=n_bank, expansion=expansion, scale=scale)
    return MLPSteering(config, random_bank(n_bank, width))


def perturbed(module: MLPSteering, seed: int = 3) -> MLPSteering:
    """The module with every parameter moved off its init, as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return module


@pytest.mark.parametrize("scale", [4.0, -2.5, 0.0])
@pytest.mark.parametrize("expansion", [1, 2, 4])
def test_init_outputs_exactly_scale_times_base(scale: float, expansion: int) -> None:
    module = make_module(scale=scale, expansion=expansion)
    generator = torch.Generator().manual_seed(0)
    for shape in [(5, 32), (2, 7, 32), (32,)]:
        resid = 100 * torch.randn(shape, generator=generator)  # large norms, as real residuals have
        out = module(resid)
        assert out.dtype == torch.float32 and out.shape == resid.shape
        assert torch.equal(out, (scale * module.bank[0]).expand(shape))
    assert torch.equal(module(resid.bfloat16()), (scale * module.bank[0]).expand(resid.shape))  # fp32 inside
    assert torch.equal(module.gates(resid), torch.zeros(*resid.shape[:-1], 6))


def test_gates_mix_the_bank_and_the_mlp_adds() -> None:
    module = make_module(scale=3.0)
    resid = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))  # (batch, d_model)
    bank = module.bank
    with torch.no_grad():
        module.gate.bias.copy_(torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0]))  # g = e_2: all of bank[2]
        assert torch.allclose(module(resid), (3.0 * bank[2]).expand(4, 32), atol=1e-5)
        module.gate.bias.copy_(torch.tensor([0.5, 0.0, 0.0, 0.0, 0.0, -0.25]))
        expected = 3.0 * (bank[0] + 0.5 * (bank[1] - bank[0]) - 0.25 * (bank[6] - bank[0]))
        assert torch.allclose(module(resid), expected.expand(4, 32), atol=1e-5)
        module.gate.bias.zero_()
        module.down.bias.copy_(torch.arange(32.0))
        assert torch.allclose(module(resid), 3.0 * bank[0] + torch.arange(32.0), atol=1e-5)
        # the gates read the RMS-normalised residual: scaling h leaves them unchanged
        module.gate.weight.normal_(generator=torch.Generator().manual_seed(4))
        assert torch.allclose(module.gates(resid), module.gates(1000 * resid), atol=1e-5)
        normed = module.normalise(resid)
        assert torch.allclose(normed.pow(2).mean(dim=-1), torch.ones(4), atol=1e-4)


@pytest.mark.oracle
@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("from_prompt_end", [False, True])
@torch.no_grad()
def test_init_module_steering_equals_caa(arch: str, from_prompt_end: bool) -> None:
    model, tokenizer = tiny(arch)
    width = d_model(model)
    config = MLPSteeringConfig(model="tiny", layer=1, d_model=width, n_bank=7, scale=4.0)
    module = MLPSteering(config, random_bank(7, width))
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    start = torch.tensor([5, 9, 7]) if from_prompt_end else None
    with steer(model, 1, vector=4.0 * module.bank[0], start_positions=start):
        caa = model(**enc).logits  # (batch, seq, vocab)
    with module.steering(model, start):
        steered = model(**enc).logits  # (batch, seq, vocab)
    baseline = model(**enc).logits
    assert active_hooks(model) == 0
    assert torch.equal(steered, caa)
    assert not torch.allclose(steered, baseline)


def test_checkpoint_round_trip_is_exact(tmp_path) -> None:
    module = perturbed(make_module())
    save_mlp(module, tmp_path / MLP_DIR.format(branch="mc"), {"branch": "mc", "note": "x"})
    for source in (tmp_path, tmp_path / "mlp" / "mc", str(tmp_path)):
        loaded = load_mlp(source, "mc")
        assert loaded.config == module.config and not loaded.training
        assert loaded.state_dict().keys() == module.state_dict().keys()
        for key, value in module.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
        resid = torch.randn(3, 32)
        assert torch.equal(loaded(resid), module(resid))
    meta = json.loads((tmp_path / "mlp" / "mc" / MLP_META).read_text())
    assert meta["module"] == dataclasses.asdict(module.config) and meta["note"] == "x"
    with pytest.raises(ValueError, match="holds a 'mc' module, not 'gen'"):
        load_mlp(tmp_path / "mlp" / "mc", "gen")
    with pytest.raises(FileNotFoundError, match=r"no mlp.safetensors in .*mlp/gen"):
        load_mlp(tmp_path, "gen")
    with pytest.raises(ValueError, match="branch='both' is not one of mc, gen"):
        load_mlp(tmp_path, "both")


def test_load_from_an_mlflow_run(tmp_path, tracking: str) -> None:
    module = perturbed(make_module(n_bank=3))
    save_mlp(module, tmp_path / "gen", {"branch": "gen"})
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(tmp_path / "gen"), MLP_DIR.format(branch="gen"))
    loaded = load_mlp(run.info.run_id, "gen")
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == sorted([MLP_TENSORS, MLP_META])


def test_config_and_bank_errors_name_the_value() -> None:
    with pytest.raises(ValueError, match="expansion=3 must be 1, 2 or 4"):
        MLPSteeringConfig(model="m", layer=0, d_model=8, n_bank=2, expansion=3)
    with pytest.raises(ValueError, match="n_bank=0 must be >= 1"):
        MLPSteeringConfig(model="m", layer=0, d_model=8, n_bank=0)
    with pytest.raises(ValueError, match="scale=nan must be a finite number"):
        MLPSteeringConfig(model="m", layer=0, d_model=8, n_bank=2, scale=float("nan"))
    with pytest.raises(ValueError, match="unknown keys \\['width'\\] and lacks \\['d_model'\\]"):
        MLPSteeringConfig.from_dict({"model": "m", "layer": 0, "width": 8, "n_bank": 2})
    config = MLPSteeringConfig(model="m", layer=0, d_model=8, n_bank=3)
    with pytest.raises(ValueError, match=r"bank has shape \(3, 9\); it must be \(n_bank, d_model\) = \(3, 8\)"):
        MLPSteering(config, torch.zeros(3, 9))
    with pytest.raises(ValueError, match="bank holds NaN or inf"):
        MLPSteering(config, torch.full((3, 8), float("nan")))
    with pytest.raises(ValueError, match="last axis must be d_model=8"):
        MLPSteering(config, torch.zeros(3, 8))(torch.zeros(2, 9))


def test_a_bank_of_only_the_base_vector_works() -> None:
    module = make_module(n_bank=1)
    resid = torch.randn(2, 32)
    assert torch.equal(module(resid), (4.0 * module.bank[0]).expand(2, 32))
