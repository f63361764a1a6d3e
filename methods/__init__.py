"""Quantization methods: one file per method; see base.py for the protocol and registry."""
