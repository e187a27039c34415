"""Side-by-side benchmarks: each script runs cpt and its baseline in one run and writes its current
result to bench/results/. Run them as scripts (`python bench/gpu_throughput.py --help`); tests import
their helpers as `bench.<name>`."""
