"""Renderers: docs/RESULTS.md and docs/PERFORMANCE.md from bench/results/*.json (no number typed by hand)."""
