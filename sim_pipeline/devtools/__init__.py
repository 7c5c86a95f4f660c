"""Tools for trying sim-pipeline without a model hub: random-weight checkpoints (meaningless scores)
used by ``make demo``, ``make random-model``, the benchmarks and the tests."""
