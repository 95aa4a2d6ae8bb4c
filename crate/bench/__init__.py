"""Speed measurements of the data stream, the training step and the interpretability records (jobs/benchmark*.py
print them; docs/benchmarks.md holds the numbers)."""
