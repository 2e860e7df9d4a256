"""Decoders: how tokens are generated after the prefill, one file each (``operators.registry`` names them)."""
