"""quantbench's llamacpp presets against llama.cpp's own ``llama-quantize``, byte for byte.

llama-quantize requantizes the SmolLM2 Q4_1 file (it dequantizes each tensor to float32, then runs the
reference quantizer of the target type, no imatrix); quantbench quantizes the same float32 values
(kernels/ggml.quantize) in the type its preset rules pick (methods/kquants.tensor_type).  Every
tensor's type must agree, and the bytes of every quantized tensor of a few layers must be identical.
Rows of attn_q/attn_k are permuted in GGUF; quantization is row-wise, so the bytes do not depend on it.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from quantbench.harness.inputs.models import smollm2_path
from quantbench.harness.tools.llamacpp import tool, tool_env
from quantbench.kernels import ggml
from quantbench.methods.kquants import PRESETS as PRESET_TYPES
from quantbench.methods.kquants import fallback_type, tensor_type

gguf = pytest.importorskip("gguf")

pytestmark = pytest.mark.slow

PRESETS = ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0"]
#: SmolLM2's hidden size 576 is no multiple of 256, so no preset puts a tensor in Q2_K; ``--pure`` (every
#: tensor in the preset's default type, or its fallback) gives Q2_K ffn_down tensors (1536 columns)
CASES = [*PRESETS, "Q2_K-pure"]
#: layers whose tensors are compared byte for byte: 0 and 2 (the use_more_bits / i_layer < n/16 rules;
#: the old Q3_K bytes of the Q2_K preset differed in layer 2) and 3 (the preset's default type)
BYTE_LAYERS = (0, 2, 3)
#: token_embd (49152 rows): the first rows only
EMBD_ROWS = 4096


def _source() -> Path:
    try:
        return smollm2_path()
    except Exception as e:  # noqa: BLE001 - any install problem means: skip
        pytest.skip(f"SmolLM2 Q4_1 source not installed: {e}")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    exe = tool("llama-quantize")
    if exe is None:
        pytest.skip("llama-quantize is not built (python -m quantbench.harness.tools.llamacpp build)")
    src = _source()
    out = tmp_path_factory.mktemp("llamaq")
    paths = {}
    for case in CASES:
        preset, _, pure = case.partition("-")
        dst = out / f"{case}.gguf"
        flags = ["--allow-requantize"] + (["--pure"] if pure else [])
        subprocess.run([str(exe), *flags, str(src), str(dst), preset, "2"], env=tool_env(), check=True,
                       capture_output=True, timeout=300)
        paths[case] = dst
    return paths


@pytest.fixture(scope="module")
def source() -> Any:
    return gguf.GGUFReader(str(_source()))  # parsing its metadata (the vocabulary) takes seconds: once


def _tensors(path: Path) -> dict[str, Any]:
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def _field(reader: Any, key: str) -> Any:
    f = reader.fields[key]
    return f.parts[f.data[0]][0]


@pytest.mark.parametrize("case", CASES)
def test_llama_quantize_bytes(quantized: dict[str, Path], source: Any, case: str) -> None:
    preset, _, pure = case.partition("-")
    src_reader = source
    src = {t.name: t for t in src_reader.tensors}
    n_layer = int(_field(src_reader, "llama.block_count"))
    n_gqa = float(_field(src_reader, "llama.attention.head_count")) / float(
        _field(src_reader, "llama.attention.head_count_kv"))
    out = _tensors(quantized[case])
    has_output = "output.weight" in out
    assert set(out) == set(src)
    checked: dict[str, int] = {}
    for name, t in out.items():
        qt = t.tensor_type.name
        s = src[name]
        if s.tensor_type.name == "F32":  # norms stay float32 in both
            assert qt == "F32", name
            continue
        shape = tuple(int(v) for v in reversed(s.shape))  # GGUF lists ne0 (the row length) first
        base = name.removesuffix(".weight")
        if pure:
            assert qt == fallback_type(PRESET_TYPES[preset], shape[1]), name
        else:
            assert qt == tensor_type(base, shape[1], preset, n_layer, n_gqa, has_output, False), name
        m = re.match(r"blk\.(\d+)\.", name)
        if (m is None or int(m.group(1)) not in BYTE_LAYERS) and not (m is None and qt == "Q8_0"):
            continue  # the other layers repeat the same types; a k-quant token_embd would be slow here
        rows = shape[0] if m else min(shape[0], EMBD_ROWS)  # rows are quantized independently
        src_rows = np.asarray(s.data).reshape(shape[0], -1)[:rows]
        w = ggml.dequantize(src_rows, s.tensor_type.name, (rows, shape[1]))
        mine = ggml.quantize(w, qt)
        ref = np.asarray(t.data, dtype=np.uint8).reshape(shape[0], -1)[:rows]
        n_bad = int((mine != ref).any(1).sum())
        assert n_bad == 0, f"{case} {name} {qt}: {n_bad}/{ref.shape[0]} rows differ from llama-quantize"
        checked[qt] = checked.get(qt, 0) + 1
    want = {"Q2_K": {"Q3_K", "Q4_0"}, "Q3_K_M": {"Q4_K", "Q5_K", "Q4_0", "Q5_0"},
            "Q4_K_M": {"Q4_K", "Q6_K", "Q5_0", "Q8_0"}, "Q5_K_M": {"Q5_K", "Q6_K", "Q5_1", "Q8_0"},
            "Q6_K": {"Q6_K", "Q8_0"}, "Q8_0": {"Q8_0"}, "Q2_K-pure": {"Q2_K", "Q4_0"}}[case]
    assert want <= set(checked), f"{case}: compared only {checked}"
