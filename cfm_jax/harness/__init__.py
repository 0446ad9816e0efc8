"""The harness: evaluation of a workdir, sweeps over experiment files, result tables."""
