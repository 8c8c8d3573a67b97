"""Benchmarks: speed, memory and reliability figures (see RESULTS.md); run each as python bench/NAME.py."""
