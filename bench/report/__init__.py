"""The report of a run: the page written to docs/benchmarks.md and the figures against their targets."""
