"""llamacpp method: llama_tensor_get_type rules, fallback table, GGMLLinear storage, imatrix."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from quantbench.harness.inputs.models import tiny_llama
from quantbench.kernels import ggml
from quantbench.methods.base import Calibration, ConfigError, build_method, linear_weight_count, model_storage
from quantbench.methods.kquants import (
    GGMLLinear,
    GGMLTensor,
    collect_imatrix,
    fallback_type,
    gguf_name,
    tensor_type,
    use_more_bits,
)

torch.set_num_threads(1)


def test_fallback_table() -> None:
    assert [fallback_type(t, 576) for t in ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]] == \
        ["Q4_0", "Q4_0", "Q5_0", "Q5_1", "Q8_0"]
    assert fallback_type("Q4_K", 1536) == "Q4_K"
    assert fallback_type("Q6_K", 100) == "F16"


def test_use_more_bits_30_layers() -> None:
    # n/8 = 3 first, 7n/8 = 26.. last, and every third in between
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


def _smollm2_type(name: str, preset: str, cols: int = 576, imatrix: bool = False) -> str:
    return tensor_type(name, cols, preset, n_layer=30, n_gqa=3.0, has_output=False, has_imatrix=imatrix)


def test_smollm2_type_choices() -> None:
    # hidden 576: 256-block types fall back; only ffn_down (rows of 1536) takes k-quants
    assert _smollm2_type("blk.0.attn_q", "Q4_K_M") == "Q5_0"
    assert _smollm2_type("blk.0.attn_v", "Q4_K_M") == "Q8_0"      # Q6_K (use_more_bits) -> Q8_0
    assert _smollm2_type("blk.3.attn_v", "Q4_K_M") == "Q5_0"
    assert _smollm2_type("blk.0.ffn_down", "Q4_K_M", 1536) == "Q6_K"
    assert _smollm2_type("blk.3.ffn_down", "Q4_K_M", 1536) == "Q4_K"
    assert _smollm2_type("token_embd", "Q4_K_M") == "Q8_0"        # tied: the output rule, nx % 256 != 0
    assert _smollm2_type("blk.0.attn_v", "Q2_K") == "Q4_0"         # n_gqa 3 < 4: Q3_K -> Q4_0
    assert _smollm2_type("blk.0.ffn_down", "Q2_K", 1536) == "Q3_K"
    assert _smollm2_type("blk.0.attn_output", "Q2_K") == "Q4_0"
    assert _smollm2_type("blk.0.ffn_up", "Q2_K") == "Q4_0"
    assert _smollm2_type("blk.0.ffn_down", "Q3_K_M", 1536) == "Q5_K"
    assert _smollm2_type("blk.5.ffn_down", "Q3_K_M", 1536) == "Q4_K"
    assert _smollm2_type("blk.3.ffn_down", "Q4_K_S", 1536) == "Q4_K"
    assert _smollm2_type("blk.2.ffn_down", "Q4_K_S", 1536) == "Q5_K"
    assert _smollm2_type("blk.0.ffn_down", "Q4_0", 1536, imatrix=True) == "Q4_1"
    assert _smollm2_type("blk.0.ffn_down", "Q4_0", 1536) == "Q4_0"
    assert _smollm2_type("token_embd", "Q8_0") == "Q8_0"
    assert _smollm2_type("token_embd", "Q4_0") == "Q8_0"          # Q6_K for the output -> fallback Q8_0
    # untied model: token_embd keeps the default type, output gets Q6_K
    assert tensor_type("token_embd", 512, "Q4_K_M", 8, 4.0, True, False) == "Q4_K"
    assert tensor_type("output", 512, "Q4_K_M", 8, 4.0, True, False) == "Q6_K"
    assert tensor_type("blk.0.attn_v", 512, "Q2_K", 8, 4.0, True, False) == "Q4_K"  # n_gqa >= 4


def test_gguf_names() -> None:
    assert gguf_name("model.layers.7.self_attn.o_proj") == "blk.7.attn_output"
    assert gguf_name("model.layers.0.mlp.down_proj") == "blk.0.ffn_down"
    assert gguf_name("model.embed_tokens") == "token_embd"


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="Q4_K_M"):
        build_method("llamacpp", {"preset": "Q4_K_X"})
    assert build_method("llamacpp", {"preset": "Q2_K", "imatrix": True}).needs_calibration
    assert not build_method("llamacpp", {"preset": "Q2_K"}).needs_calibration


def test_ggml_linear_storage_and_forward() -> None:
    w = torch.randn(64, 512)
    lin = GGMLLinear.from_weight(w, "Q4_K")
    st = lin.storage()
    assert st.total == 64 * 2 * 144 and st.scales_zeros == 64 * 2 * 16 and st.quantized_weights == 64 * 512
    x = torch.randn(3, 512)
    deq = torch.from_numpy(ggml.dequantize(ggml.quantize(w, "Q4_K"), "Q4_K", (64, 512)))
    torch.testing.assert_close(lin(x), x @ deq.T)
    assert lin.qdata.dtype == torch.uint8


@pytest.mark.parametrize("preset,bpw_lo,bpw_hi", [("Q4_K_M", 4.5, 5.2), ("Q2_K", 2.6, 3.3), ("Q8_0", 8.5, 8.5)])
def test_quantize_tiny_llama(preset: str, bpw_lo: float, bpw_hi: float) -> None:
    lm = tiny_llama()
    x = torch.randint(0, 256, (1, 32))
    with torch.no_grad():
        ref = lm.model(x).logits
    m = build_method("llamacpp", {"preset": preset})
    q = m.quantize(copy.deepcopy(lm.model), None)
    types = m.artifacts["tensor_types"]
    assert sum(m.artifacts["type_histogram"].values()) == len(types) == 15
    st = model_storage(q)
    bpw = 8 * st["linear"].total / linear_weight_count(q)
    assert bpw_lo <= bpw <= bpw_hi
    # the tied embedding is quantized too (output rule: Q6_K; Q8_0 for Q8_0) and counted as packed bytes
    emb = q.get_input_embeddings()
    assert isinstance(emb, GGMLTensor) and emb.qtype == ("Q8_0" if preset == "Q8_0" else "Q6_K")
    assert st["other"].packed_weights > 0 and q.lm_head.weight.data_ptr() == emb.weight.data_ptr()
    with torch.no_grad():
        out = q(x).logits
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < {"Q4_K_M": 0.2, "Q2_K": 0.5, "Q8_0": 0.03}[preset]


def test_imatrix_collection_and_effect() -> None:
    lm = tiny_llama()
    calib = Calibration(torch.randint(0, 256, (2, 32)), "random", 0)
    imat = collect_imatrix(lm.model, calib, ["model.layers.0.mlp.down_proj"])
    # E[x^2] over 64 tokens, checked against a direct capture of the inputs
    seen = []
    h = lm.model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        for b in calib.batches(1):
            lm.model(b)
    h.remove()
    xs = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])
    torch.testing.assert_close(imat["model.layers.0.mlp.down_proj"], (xs * xs).mean(0), rtol=1e-5, atol=1e-8)
    m = build_method("llamacpp", {"preset": "Q4_K_M", "imatrix": True})
    q = m.quantize(copy.deepcopy(lm.model), calib)
    q0 = build_method("llamacpp", {"preset": "Q4_K_M"}).quantize(copy.deepcopy(lm.model), None)
    a = q.model.layers[0].mlp.down_proj.qdata
    b = q0.model.layers[0].mlp.down_proj.qdata
    assert not torch.equal(a, b)
    # importance-weighted output error of the layer is lower with the imatrix
    w = lm.model.model.layers[0].mlp.down_proj.weight.detach()
    imp = imat["model.layers.0.mlp.down_proj"]
    def werr(mod: GGMLLinear) -> float:
        return float((imp * (mod.dequantized_weight() - w) ** 2).sum())
    assert werr(q.model.layers[0].mlp.down_proj) < werr(q0.model.layers[0].mlp.down_proj)
    assert np.isfinite(werr(q.model.layers[0].mlp.down_proj))
