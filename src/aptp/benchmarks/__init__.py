"""Benchmarks: commands that time things side by side in one run and print ratios."""
