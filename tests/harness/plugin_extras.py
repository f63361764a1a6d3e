"""Test-only plugin (loaded through $QUANTBENCH_PLUGINS): one method and one metric, each registered once."""

from quantbench.harness.measure.base import MetricResult, metric
from quantbench.methods.base import Method, register
from quantbench.methods.fp import FPConfig


@register
class PluginIdentity(Method):
    """Leaves the model as it is (a plugin method)."""

    name = "test-plugin-identity"
    config_cls = FPConfig

    def quantize(self, model, calib):
        return model


@metric("test_plugin_param_count", unit="params", higher_is_better=None, label="plugin params", order=99,
        tolerance={"rel": 0.0})
def param_count(ctx):
    return [MetricResult(float(sum(p.numel() for p in ctx.model.parameters())))]
