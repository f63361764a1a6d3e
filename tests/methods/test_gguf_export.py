"""GGUF export of a llamacpp-quantized tiny llama: read back with gguf.GGUFReader and transformers."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from quantbench.harness.inputs.models import tiny_llama
from quantbench.methods.base import build_method
from quantbench.methods.gguf_export import export_gguf, permute_rows, read_gguf_tensors
from quantbench.methods.kquants import GGMLLinear

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    lm = tiny_llama()
    m = build_method("llamacpp", {"preset": "Q3_K_M"})
    q = m.quantize(copy.deepcopy(lm.model), None)
    path = export_gguf(q, lm.tokenizer, lm.info, tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    return q, path


def test_permute_is_inverse_of_transformers_unpermute() -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(16 * 3).reshape(16, 3)
    proc = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    for n_head, n_kv in [(4, 4), (4, 2)]:
        back = proc._reverse_permute_weights(permute_rows(w, n_head, n_kv), n_head, n_kv)
        np.testing.assert_array_equal(back, w)
        assert not np.array_equal(permute_rows(w, n_head, n_kv), w)


def test_tensors_bytes_types_shapes(exported: tuple[torch.nn.Module, Path]) -> None:
    q, path = exported
    t = read_gguf_tensors(path)
    assert len(t) == 1 + 2 * 9 + 1  # token_embd, 2 x (7 linears + 2 norms), output_norm; output tied
    assert "output.weight" not in t
    for name, mod in q.named_modules():
        if isinstance(mod, GGMLLinear):
            i = name.split(".")[2]
            short = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                     "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[name.split(".")[-1]]
            qtype, shape, data = t[f"blk.{i}.{short}.weight"]
            assert qtype == mod.qtype and shape == (mod.out_features, mod.in_features)
            ours = mod.qdata.numpy()
            if short == "attn_q":
                ours = permute_rows(ours, 4, 4)
            elif short == "attn_k":
                ours = permute_rows(ours, 4, 2)
            np.testing.assert_array_equal(data, ours)
    emb = q.get_input_embeddings()
    assert t["token_embd.weight"][0] == emb.qtype == "Q6_K"
    np.testing.assert_array_equal(t["token_embd.weight"][2], emb.qdata.numpy())
    assert t["blk.1.ffn_down.weight"][0] == "Q4_K" and t["blk.0.attn_v.weight"][0] == "Q5_K"


def test_transformers_loads_same_logits(exported: tuple[torch.nn.Module, Path]) -> None:
    from transformers import AutoModelForCausalLM

    q, path = exported
    m2 = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    x = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = q(x).logits, m2(x).logits
    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_hf_directory_vocab_equals_the_llama_cpp_converted_one(tmp_path: Path) -> None:
    """A model from an HF directory gets its ``tokenizer.*`` keys from the directory's tokenizer files: for
    SmolLM2 (byte-level BPE) the token list, types and merges equal those of the embedded GGUF, which
    llama.cpp's converter wrote; without them llama.cpp refuses the file ("tokenizer.ggml.model" missing)."""
    from gguf import GGUFReader, GGUFWriter

    from quantbench.harness.inputs.models import load_smollm2
    from quantbench.methods.gguf_export import _write_hf_vocab

    lm = load_smollm2()
    lm.tokenizer.save_pretrained(tmp_path / "hf")
    out = tmp_path / "vocab.gguf"
    w = GGUFWriter(str(out), "llama")
    assert _write_hf_vocab(w, tmp_path / "hf", int(lm.model.config.vocab_size)) == "gpt2"
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    def fields(path: Path | str) -> dict[str, list]:
        r = GGUFReader(str(path))
        return {k: r.fields[k].contents() for k in ("tokenizer.ggml.model", "tokenizer.ggml.tokens",
                                                   "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                                                   "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")}

    got, want = fields(out), fields(lm.info["source"])
    assert len(got["tokenizer.ggml.tokens"]) == 49152
    for k in want:
        assert got[k] == want[k], k
