"""Benchmarks behind `wesam bench`; each writes JSON and a section of bench/RESULTS.md."""
