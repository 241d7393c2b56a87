"""Efficiency benchmarks; results are written as JSON + Markdown with the machine recorded."""
