"""KV-cache memory calculator: bytes of K and V for a model shape, context and KV method.

fp16 cache: ``2 (K, V) x L x H_kv x d_h x T x batch x 2 bytes``; Llama-3-70B (L=80, H_kv=8,
d_h=128) at T=131072 tokens is 42.9e9 B (42.9 GB decimal, 40 GiB).  Each KV method owns its
formula (``Method.kv_cache_bytes``, in its own file: ``kvquant.py``), counting its overheads exactly
as its cache stores them; this module looks the method up in the registry, and holds the model
shape helpers and the Llama-3-70B table.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import build_method

LLAMA3_70B = {"n_layers": 80, "n_kv_heads": 8, "head_dim": 128}
OUTLIER_BYTES = 6  # int32 flat index + fp16 value


def head_dim_of(model: nn.Module) -> int:
    cfg: Any = model.config
    hd = getattr(cfg, "head_dim", None)
    return int(hd) if hd else cfg.hidden_size // cfg.num_attention_heads


def kv_heads_of(model: nn.Module) -> int:
    cfg: Any = model.config
    return int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)


def kv_shape(model: nn.Module) -> dict[str, int]:
    """``n_layers``, ``n_kv_heads`` and ``head_dim`` of a transformers model's KV cache."""
    cfg: Any = model.config
    return {"n_layers": int(cfg.num_hidden_layers), "n_kv_heads": kv_heads_of(model),
            "head_dim": head_dim_of(model)}


def cache_bytes(**parts: float) -> dict[str, float]:
    """A cache's bytes by component (codes, scales, outliers, fp16, static; absent ones 0) and their total."""
    out = {"codes": 0.0, "scales": 0.0, "outliers": 0.0, "fp16": 0.0, "static": 0.0, **parts}
    out["total"] = sum(out.values())
    return out


def fp16_cache_bytes(*, n_layers: int, n_kv_heads: int, head_dim: int, tokens: int, batch: int = 1,
                     key_outliers: int | None = None) -> dict[str, float]:
    """The unquantized cache with K and V in fp16 (``key_outliers`` is ignored)."""
    return cache_bytes(fp16=2 * n_layers * batch * n_kv_heads * head_dim * tokens * 2)


def kv_cache_bytes(
    method: str,
    params: dict[str, Any] | None,
    *,
    n_layers: int,
    n_kv_heads: int,
    head_dim: int,
    tokens: int,
    batch: int = 1,
    key_outliers: int | None = None,
) -> dict[str, float]:
    """Bytes by component (codes, scales, outliers, fp16, static, total) of the cache of ``method``.

    The KV method's own formula (``Method.kv_cache_bytes``); a method that leaves the KV cache alone
    (``fp``, weight methods) gives the fp16 cache.  ``key_outliers``: KVQuant's key outlier count over
    the whole cache when known (the calibrated per-channel thresholds make it data dependent); default
    ``outlier_frac`` of the quantized keys.
    """
    m = build_method(method, params)
    formula = m.kv_cache_bytes if m.quantizes("kv") else fp16_cache_bytes
    return formula(n_layers=n_layers, n_kv_heads=n_kv_heads, head_dim=head_dim, tokens=tokens, batch=batch,
                   key_outliers=key_outliers)


def kv_bytes_per_token_for(
    method: str, params: dict[str, Any] | None, *, n_layers: int, n_kv_heads: int, head_dim: int, tokens: int = 4096
) -> float:
    """Bytes per token (amortized at ``tokens`` context, batch 1) for one method on one model."""
    tot = kv_cache_bytes(method, params, n_layers=n_layers, n_kv_heads=n_kv_heads, head_dim=head_dim, tokens=tokens)[
        "total"
    ]
    return tot / tokens


SUITE_ROWS: list[tuple[str, dict[str, Any]]] = [
    ("kv-fp16", {}),
    ("kv-uniform", {"bits": 4}),
    ("kv-uniform", {"bits": 2}),
    ("kivi", {"bits": 2, "group_size": 32, "residual_length": 128}),
    ("kvquant", {"bits": 4, "outlier_frac": 0.01}),
    ("kvquant", {"bits": 3, "outlier_frac": 0.01}),
    ("kvquant", {"bits": 2, "outlier_frac": 0.01}),
]


def llama3_70b_table(tokens: int = 131072, batch: int = 1) -> list[dict[str, Any]]:
    """Per method row: GB (decimal), GiB and bits per element for Llama-3-70B at ``tokens``."""
    rows = []
    elems = 2 * LLAMA3_70B["n_layers"] * LLAMA3_70B["n_kv_heads"] * LLAMA3_70B["head_dim"] * tokens * batch
    for m, prm in SUITE_ROWS:
        b = kv_cache_bytes(m, prm, tokens=tokens, batch=batch, **LLAMA3_70B)
        rows.append(
            {
                "method": m,
                "params": prm,
                "GB": round(b["total"] / 1e9, 2),
                "GiB": round(b["total"] / 2**30, 2),
                "bits_per_element": round(8 * b["total"] / elems, 3),
            }
        )
    return rows
