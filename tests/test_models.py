"""Model registry and loader: every alias resolves without weights; hub models fail fast offline;
the offline models load for real (slow)."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from core.config import ConfigError
from core.config_io import model_aliases, model_spec
from core.models import (
    ModelUnavailable,
    check_available,
    converted_dir,
    load_model,
    resolve_device,
    resolve_prompt_format,
)
from steering.layers import decoder_layers
from steering.prompts import encode_prompt_answers, encode_prompts, encode_text, format_prompt

HUB_ALIASES = [a for a in model_aliases() if model_spec(a).source == "hub"]


def test_registry_has_the_researchers_models() -> None:
    expected = {"smollm2-135m", "gemma-3-270m", "gemma-2-2b", "gemma-2-9b", "gemma-2-27b", "gemma-2-2b-it",
                "gemma-2-9b-it", "gemma-2-27b-it", "gemma-3-270m-it", "gemma-3-1b-it", "gemma-3-4b-it",
                "gemma-3-12b-it", "gemma-3-27b-it"}
    assert set(model_aliases()) == expected


@pytest.mark.parametrize("alias", model_aliases())
def test_every_alias_resolves_without_weights(alias: str) -> None:
    spec = model_spec(alias)
    assert spec.alias == alias
    assert 0 <= spec.default_layer < spec.n_layers
    if alias.startswith("gemma"):
        assert spec.dtype == "bfloat16" or spec.source == "gguf"
        assert spec.dtype != "float16"
    if alias.startswith("gemma-3-") and alias.split("-")[2] in ("4b", "12b", "27b"):
        assert spec.architecture == "gemma3_mm"  # multimodal checkpoints: layers under language_model


@pytest.mark.parametrize("alias", HUB_ALIASES)
def test_hub_models_fail_fast_offline_with_a_fix(alias: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    start = time.monotonic()
    with pytest.raises(ModelUnavailable) as err:
        load_model(alias)  # must fail in check_available, before any weights load
    message = str(err.value)
    assert time.monotonic() - start < 30
    assert model_spec(alias).hf_id in message and "hf download" in message and "smollm2-135m" in message
    assert "hf_secret_token_value" not in message


def test_hub_check_without_the_offline_flag_probes_the_host(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # never resolves
    with pytest.raises(ModelUnavailable, match=r"hub \(hub.invalid\) cannot be reached"):
        check_available(model_spec("gemma-2-2b"))


def test_missing_gguf_package_names_the_install_command(tmp_path) -> None:
    spec = dataclasses.replace(model_spec("smollm2-135m"), gguf_package="no_such_package_xyz")
    with pytest.raises(ModelUnavailable, match="'no_such_package_xyz', which is not installed; run `make setup`"):
        check_available(spec, cache_dir=str(tmp_path))


def test_devices_are_checked() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:1")


def test_prompt_format_follows_the_chat_template() -> None:
    class Tok:
        chat_template: str | None = None

    spec = model_spec("gemma-3-270m")
    assert resolve_prompt_format(spec, Tok()) == "qa"
    with_template = Tok()
    with_template.chat_template = "{{ messages }}"
    assert resolve_prompt_format(spec, with_template) == "chat"
    with pytest.raises(ConfigError, match="has no chat template"):
        resolve_prompt_format(dataclasses.replace(spec, prompt_format="chat"), Tok())


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2-135m", dtype="float32", device="cpu")


@pytest.mark.slow
def test_smollm2_loads_for_real_and_caches(smollm2) -> None:
    spec = model_spec("smollm2-135m")
    assert type(smollm2.model).__name__ == "LlamaForCausalLM"
    assert len(decoder_layers(smollm2.model)) == spec.n_layers
    assert smollm2.model.config.hidden_size == spec.d_model
    assert smollm2.dtype == torch.float32 and smollm2.device == torch.device("cpu")
    assert not any(p.requires_grad for p in smollm2.model.parameters())
    assert smollm2.tokenizer.padding_side == "left" and smollm2.tokenizer.pad_token_id is not None
    assert smollm2.prompt_format == "chat"
    assert converted_dir(spec).joinpath("model.safetensors").exists()
    again = load_model("smollm2-135m", dtype="float32", device="cpu")  # from the converted cache
    for (name, a), (_, b) in zip(smollm2.model.state_dict().items(), again.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_smollm2_prompts_have_one_bos_and_answer_greedily(smollm2) -> None:
    tok = smollm2.tokenizer
    prompt = format_prompt("What is the capital of France?", tok, smollm2.prompt_format)
    ids = encode_text(tok, prompt)
    assert ids.count(tok.bos_token_id) == prompt.count(tok.bos_token)  # no extra BOS added
    batch = encode_prompts(tok, [prompt, format_prompt("Hi?", tok, "chat")])
    assert batch["attention_mask"][1, 0] == 0  # the shorter prompt is left-padded
    out = smollm2.model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, batch["input_ids"].shape[1]:])
    pairs = encode_prompt_answers(tok, [prompt, prompt], ["Paris.", "Lyon is the capital."], max_length=64)
    n_answer = [len(tok("Paris.", add_special_tokens=False)["input_ids"]),
                len(tok("Lyon is the capital.", add_special_tokens=False)["input_ids"])]
    assert pairs["answer_mask"].sum(1).tolist() == n_answer
    width = pairs["input_ids"].shape[1]
    assert pairs["prompt_end"].tolist() == [width - n - 1 for n in n_answer]


@pytest.mark.slow
def test_gemma3_270m_loads_as_gemma3_text_with_plain_prompts() -> None:
    loaded = load_model("gemma-3-270m", dtype="float32", device="cpu")
    spec = model_spec("gemma-3-270m")
    assert type(loaded.model).__name__ == "Gemma3ForCausalLM"
    assert len(decoder_layers(loaded.model)) == spec.n_layers
    assert loaded.model.config.hidden_size == spec.d_model
    assert loaded.prompt_format == "qa"
    ids = encode_text(loaded.tokenizer, format_prompt("Why?", loaded.tokenizer, "qa"))
    assert ids[0] == loaded.tokenizer.bos_token_id and ids.count(loaded.tokenizer.bos_token_id) == 1
