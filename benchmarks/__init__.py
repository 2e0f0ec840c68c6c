"""Benchmarks: each module answers one question and writes JSON under benchmarks/results/."""
