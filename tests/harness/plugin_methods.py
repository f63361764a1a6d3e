"""Test-only methods, loaded through $QUANTBENCH_PLUGINS (so Ray workers see them too)."""

import os
from pathlib import Path

from quantbench.methods.base import Method, register
from quantbench.methods.fp import FPConfig


@register
class Boom(Method):
    """Raises during quantization."""

    name = "test-boom"
    config_cls = FPConfig

    def quantize(self, model, calib):
        raise RuntimeError("boom at quantize")


@register
class DieOnce(Method):
    """Kills its own process the first time it runs (a lost worker), then behaves like fp."""

    name = "test-die-once"
    config_cls = FPConfig

    def quantize(self, model, calib):
        marker = Path(os.environ["QB_TEST_DIE_MARKER"])
        if not marker.exists():
            marker.write_text("died")
            os._exit(1)
        return model


@register
class DieAlways(Method):
    """Kills its own process every time."""

    name = "test-die"
    config_cls = FPConfig

    def quantize(self, model, calib):
        os._exit(1)
