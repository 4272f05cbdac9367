"""Probes: measurements behind a design choice (SDPA NaNs, saved prompt sizes, a training step profiled)."""
