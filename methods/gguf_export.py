"""Export a llamacpp-quantized llama model to a GGUF file llama.cpp loads (gguf.GGUFWriter).

Tensors keep the exact ggml block bytes of the quantized modules, named as llama.cpp names them
(``token_embd``, ``blk.N.attn_q`` ...).  attn_q / attn_k rows are permuted as llama.cpp's
convert_hf_to_gguf.py does for llama (the inverse of transformers' GGUF loader un-permute); ggml rows
are independent, so permuting the rows of the block bytes is exact.  Metadata: the ``llama``
architecture keys, and the tokenizer keys (``tokenizer.*``) copied from the source GGUF when the model
came from one (the default smollm2 does), else built from the source HF directory's tokenizer files
by gguf-py's vocab readers.

Compatibility: GGUF v3, the ggml types Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q2_K..Q6_K/F16/F32 and the llama
key set that llama.cpp has read since the GGUF switch (llama.cpp b1000+, Aug 2023; k-quants since
June 2023); also read by transformers' ``from_pretrained(..., gguf_file=...)`` (tested).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, cast

import gguf
import gguf.vocab as gguf_vocab
import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from torch import nn

from ..kernels import ggml
from .kquants import GGMLLinear, GGMLTensor, gguf_name

log = logging.getLogger(__name__)

_FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
              "Q3_K": 12, "Q4_K": 15, "Q5_K": 17, "Q6_K": 18}  # llama_ftype (*_M variants for k-quants)


def permute_rows(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """convert_hf_to_gguf's llama q/k permute (rows grouped per head, halves interleaved)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tensor_bytes(mod: nn.Module) -> tuple[np.ndarray, str]:
    if isinstance(mod, (GGMLLinear, GGMLTensor)):
        return mod.qdata.cpu().numpy(), mod.qtype
    w = cast(torch.Tensor, mod.weight).detach().float().cpu().numpy()
    return w, "F32"


def _copy_source_kv(writer: GGUFWriter, source: str, prefixes: tuple[str, ...]) -> int:
    reader = GGUFReader(source)
    n = 0
    for name, field in reader.fields.items():
        if not name.startswith(prefixes) or not field.types:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub)
        n += 1
    return n


def _write_hf_vocab(writer: GGUFWriter, directory: Path, n_vocab: int) -> str:
    """The ``tokenizer.*`` keys from an HF model directory's tokenizer files, read by gguf-py's own vocab
    classes (as llama.cpp's converters do): byte-level BPE (``gpt2``), else SentencePiece (``llama``);
    special token ids and BPE merges by ``SpecialVocab``. The token list is padded to the model's vocab size
    with unused entries (as the converters do). No ``tokenizer.ggml.pre``: llama.cpp then uses its default
    pre-tokenizer and says so (the converter's per-model pre-tokenizer table is not reproduced here)."""
    vocab: Any = None
    errors = []
    for cls in (gguf_vocab.BpeVocab, gguf_vocab.LlamaHfVocab, gguf_vocab.SentencePieceVocab):
        try:
            vocab = cls(directory)
            break
        except (FileNotFoundError, ValueError, TypeError, ImportError) as e:  # not this kind of tokenizer
            errors.append(f"{cls.__name__}: {e}")
    if vocab is None:
        raise ValueError(f"gguf export: no tokenizer gguf can read in {directory} ({'; '.join(errors)})")
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    tj = directory / "tokenizer.json"
    if tj.exists():  # added tokens: control when special, else user-defined (as llama.cpp's converter marks them)
        for item in json.loads(tj.read_text(encoding="utf-8")).get("added_tokens") or []:
            if 0 <= int(item["id"]) < len(types):
                types[int(item["id"])] = gguf.TokenType.CONTROL if item.get("special") else gguf.TokenType.USER_DEFINED
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf_vocab.SpecialVocab(directory, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=n_vocab).add_to_gguf(writer)
    return str(vocab.tokenizer_model)


def export_gguf(model: nn.Module, tokenizer: Any, info: dict[str, Any], path: str | Path) -> Path:
    """Write ``model`` (llama; llamacpp-quantized or float) to ``path`` as GGUF; returns the path."""
    path = Path(path)
    cfg: Any = model.config  # the transformers config; its attributes depend on the architecture
    n_head, n_kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    w = GGUFWriter(str(path), "llama")
    w.add_name(str(info.get("name", "model")))
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(int(n_head))
    w.add_head_count_kv(int(n_kv))
    w.add_rope_dimension_count(int(head_dim))
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(int(cfg.vocab_size))
    source = str(info.get("source", ""))
    types: list[str] = []
    tensors: list[tuple[str, np.ndarray, str]] = []
    emb = cast(Any, model).get_input_embeddings()  # transformers PreTrainedModel methods
    head = cast(Any, model).get_output_embeddings()
    tied = head is None or getattr(head, "weight", None) is getattr(emb, "weight", None) or (
        isinstance(emb, GGMLTensor) and not isinstance(head, GGMLTensor)
        and head.weight.data_ptr() == emb.weight.data_ptr())
    data, t = _tensor_bytes(emb)
    tensors.append(("token_embd.weight", data, t))
    for name, mod in model.named_modules():
        if not name.startswith("model.layers."):
            continue
        if isinstance(mod, (GGMLLinear, nn.Linear)):
            gname = gguf_name(name)
            data, t = _tensor_bytes(mod)
            if gname.endswith(".attn_q"):
                data = permute_rows(data, n_head, n_head)
            elif gname.endswith(".attn_k"):
                data = permute_rows(data, n_head, n_kv)
            tensors.append((gname + ".weight", data, t))
            types.append(t)
        elif name.endswith("input_layernorm") or name.endswith("post_attention_layernorm"):
            i = name.split(".")[2]
            suffix = "attn_norm" if name.endswith("input_layernorm") else "ffn_norm"
            tensors.append((f"blk.{i}.{suffix}.weight", cast(torch.Tensor, mod.weight).detach().float().cpu().numpy(),
                            "F32"))
    tensors.append(("output_norm.weight", cast(Any, model).model.norm.weight.detach().float().cpu().numpy(), "F32"))
    if not tied:
        data, t = _tensor_bytes(head)
        tensors.append(("output.weight", data, t))
    main = max(set(types), key=types.count) if types else "F32"
    w.add_file_type(_FILE_TYPE.get(main, 0))
    if source.endswith(".gguf") and Path(source).exists():
        n = _copy_source_kv(w, source, ("tokenizer.",))
        log.info("copied %d tokenizer fields from %s", n, source)
    elif Path(source).is_dir():
        model_kind = _write_hf_vocab(w, Path(source), int(cfg.vocab_size))
        log.info("tokenizer (%s) written from the HF directory %s", model_kind, source)
    else:
        log.warning("gguf export: source %r is neither a GGUF file nor an HF directory; no tokenizer metadata "
                    "written (llama.cpp will refuse the file)", source)
    for name, data, t in tensors:
        if t == "F32":
            w.add_tensor(name, np.ascontiguousarray(data, dtype=np.float32))
        else:
            w.add_tensor(name, np.ascontiguousarray(data), raw_dtype=getattr(GGMLQuantizationType, t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def read_gguf_tensors(path: str | Path) -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    """{name: (ggml type name, shape as torch [rows, cols], raw data)} of a GGUF file."""
    out = {}
    for t in GGUFReader(str(path)).tensors:
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        out[t.name] = (GGMLQuantizationType(t.tensor_type).name, shape, np.array(t.data))
    return out


def dequantize_gguf_tensor(entry: tuple[str, tuple[int, ...], np.ndarray]) -> torch.Tensor:
    qtype, shape, data = entry
    if qtype in ("F32", "F16"):
        return torch.from_numpy(np.asarray(data, dtype=np.float32).reshape(shape))
    return torch.from_numpy(ggml.dequantize(data, qtype, shape))
