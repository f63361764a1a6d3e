"""Block-wise GPTQ with the fp blocks on disk: same result, one fp block resident at a time."""

import copy

import torch

from quantbench.harness.inputs.models import tiny_llama
from quantbench.methods.base import Calibration, build_method
from quantbench.methods.offload import resident_bytes


def test_offloaded_gptq_equals_in_memory_and_holds_one_block():
    lm = tiny_llama(layers=3)
    calib = Calibration(torch.randint(0, 256, (4, 64)), "random", 0)
    x = torch.randint(0, 256, (1, 48))
    params = {"bits": 4, "group_size": 64}
    a = build_method("gptq", params).quantize(copy.deepcopy(lm.model), calib)
    m = build_method("gptq", {**params, "offload": True})
    b = m.quantize(copy.deepcopy(lm.model), calib)
    assert torch.equal(a(x).logits, b(x).logits)
    block_fp = resident_bytes(lm.model.model.layers[0])
    quant_blocks = resident_bytes(b.model.layers)  # all blocks quantized at the end
    peak = m.artifacts["offload_max_resident_block_bytes"]
    # at most one fp block plus the (much smaller) quantized blocks — never all fp blocks
    assert block_fp <= peak <= block_fp + quant_blocks
    assert peak < 2 * block_fp < 3 * block_fp
