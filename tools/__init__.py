"""One-off tuning, sweeps, replays and profiling; run them from the repository root as
``python -m tools.<name>`` (see README.md). Not part of the benchmark suite."""
