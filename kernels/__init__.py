"""Packed formats and kernels. Every packed format has a pure-torch reference."""
