"""quantbench: a benchmark and evaluation harness for LLM quantization."""

__version__ = "0.1.0"
