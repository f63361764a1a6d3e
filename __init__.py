"""quantbench: a benchmark and evaluation harness for LLM quantization.

The checkout's root is the ``quantbench`` package (pyproject maps it): ``harness/``, ``methods/`` and
``kernels/`` are its subpackages, so the relative imports between them resolve from the tree alone.
"""

__version__ = "0.1.0"
