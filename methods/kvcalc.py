"""KV-cache memory calculator: bytes of K and V for a model shape, context and KV method.

fp16 cache: ``2 (K, V) x L x H_kv x d_h x T x batch x 2 bytes``; Llama-3-70B (L=80, H_kv=8,
d_h=128) at T=131072 tokens is 42.9e9 B (42.9 GB decimal, 40 GiB).  Quantized methods add
their overheads exactly as :class:`quantbench.kernels.kvcache.QuantizedKVCache` stores them:
fp16 scale+zero per group (kv-uniform, KIVI), fp16 per-token range over all KV heads (KVQuant
values), sparse outliers at 6 B each (int32 flat index + fp16 value; KVQuant values: the
``outlier_frac / 2`` largest and smallest of each token, at least one each), fp16 sink tokens and
recent window, and per-layer calibrated state (KVQuant keys' fp16 lower/upper thresholds per
channel, centroids).
"""

from __future__ import annotations

from typing import Any

LLAMA3_70B = {"n_layers": 80, "n_kv_heads": 8, "head_dim": 128}
OUTLIER_BYTES = 6  # int32 flat index + fp16 value


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
    """Bytes by component (codes, scales, outliers, fp16, static, total) for the whole cache.

    ``key_outliers``: KVQuant's key outlier count over the whole cache when known (the calibrated
    per-channel thresholds make it data dependent); default ``outlier_frac`` of the quantized keys.
    """
    p = dict(params or {})
    L, H, D, T, B = n_layers, n_kv_heads, head_dim, tokens, batch
    out = {"codes": 0.0, "scales": 0.0, "outliers": 0.0, "fp16": 0.0, "static": 0.0}
    if method in ("fp", "kv-fp16"):
        out["fp16"] = 2 * L * B * H * D * T * 2
    elif method == "kv-uniform":
        b, g = p.get("bits", 4), p.get("group_size", -1)
        g = D if g in (-1, 0) else g
        out["codes"] = 2 * L * B * H * T * D * b / 8
        out["scales"] = 2 * L * B * H * T * (D // g) * 4
    elif method == "kivi":
        b, g, r = p.get("bits", 2), p.get("group_size", 32), p.get("residual_length", 32)
        tq = max(T - r, 0) // g * g
        gv = g if D % g == 0 else D
        out["codes"] = 2 * L * B * H * tq * D * b / 8
        out["scales"] = L * B * H * ((tq // g) * D * 4 + tq * (D // gv) * 4)
        out["fp16"] = 2 * L * B * H * (T - tq) * D * 2
    elif method == "kvquant":
        b, f, s = p.get("bits", 4), p.get("outlier_frac", 0.01), p.get("sink", 1)
        s = min(s, T)
        tq = T - s
        out["codes"] = 2 * L * B * H * tq * D * b / 8
        out["scales"] = L * B * tq * 4  # values: fp16 lo, hi per token (over all KV heads)
        kout = key_outliers if key_outliers is not None else L * B * H * tq * D * f
        vout = L * B * tq * 2 * max(1, int(round(f * H * D / 2))) if f > 0 else 0
        out["outliers"] = (kout + vout) * OUTLIER_BYTES
        out["fp16"] = 2 * L * B * H * s * D * 2
        out["static"] = L * (2 * H * D * 2 + 2 * (2**b) * 2)  # keys' lo/hi thresholds, centroids
    else:
        raise ValueError(f"kvcalc: unknown KV method '{method}'")
    out["total"] = sum(out.values())
    return out


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
