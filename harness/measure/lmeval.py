"""quantbench's quantized models as an lm-evaluation-harness model, ``--model quantbench``.

``QuantbenchLM`` loads a model through quantbench's loaders, quantizes it with
``build_method(method, params)`` (calibrating on the wiki calibration split where the method
needs it) and delegates everything else to lm-eval's ``HFLM`` over the in-memory model::

    python -m quantbench.harness.measure.lmeval --model quantbench \\
        --model_args method=rtn,bits=4,group_size=128,model=smollm2-135m --tasks mmlu_qb --limit 50

Every key of ``--model_args`` that is not one of ``model, method, n_samples, seq_len,
calibration, seed`` is a parameter of the method.  The class is registered with lm-eval's model
registry on import and declared as an ``lm_eval.models`` entry point; lm-eval 0.4.13 does not read
that entry-point group, so ``python -m quantbench.harness.measure.lmeval`` (the ``lm_eval`` CLI with this
module imported and quantbench's local task directory on the include path) is the reliable form.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from ...methods.quantize import quantize
from ..inputs import data
from ..inputs.models import load_model
from .tasks import ContinuationLogits, _offline_env, hf_tokenizer, task_dir

log = logging.getLogger(__name__)

OWN_ARGS = ("model", "method", "n_samples", "seq_len", "calibration", "seed")


def build_quantized(model: str = "smollm2-135m", method: str = "fp", n_samples: int = 32, seq_len: int = 512,
                    calibration: str = "wiki", seed: int = 0, **params: Any) -> tuple[Any, Any]:
    """(quantized model, tokenizer) for a registry model name (or HF/GGUF path) and a method.

    The loaded model goes through :func:`~quantbench.methods.quantize.quantize` with ``seed``, calibrated
    (only if the method needs it) on ``n_samples`` windows of ``seq_len`` tokens of ``calibration``.
    """
    spec: Any = model if "/" not in str(model) else {"path": str(model)}
    base = load_model(spec)
    cal = {"dataset": calibration, "n_samples": n_samples, "seq_len": seq_len}
    qmodel, _ = quantize(base.model, [(method, params)], lambda: data.calibration(cal, base.tokenizer, seed), seed)
    return qmodel.eval(), base.tokenizer


@register_model("quantbench")
class QuantbenchLM(ContinuationLogits, HFLM):
    """HFLM over a model quantized by quantbench (``--model_args method=...,<method params>``); loglikelihood
    forwards project only the continuation positions lm-eval reads (:class:`~.tasks.ContinuationLogits`, as
    the suites' accuracy metric does)."""

    def __init__(self, model: str = "smollm2-135m", method: str = "fp", batch_size: int | str = 8,
                 n_samples: int = 32, seq_len: int = 512, calibration: str = "wiki", seed: int = 0,
                 device: str | None = None, max_batch_size: int | None = 64, **params: Any) -> None:
        _offline_env()
        params = {k: v for k, v in params.items() if k not in ("dtype", "trust_remote_code")}
        qmodel, tok = build_quantized(model, method, n_samples, seq_len, calibration, seed, **params)
        if device and device != "cpu":
            if torch.cuda.is_available():
                qmodel = qmodel.to(device)
        self.quantbench_config = {"model": model, "method": method, **params}
        super().__init__(pretrained=qmodel, tokenizer=hf_tokenizer(tok), batch_size=batch_size,
                         max_batch_size=max_batch_size)


def main(argv: list[str] | None = None) -> None:
    """The ``lm_eval`` CLI with ``quantbench`` registered and the local tasks on the include path."""
    from lm_eval.__main__ import cli_evaluate

    _offline_env()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--include_path" not in argv:
        argv += ["--include_path", str(task_dir())]
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
