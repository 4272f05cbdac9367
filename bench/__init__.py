"""softprompt's benchmarks: a harness (bench.harness) and entry points run from the
repository root as ``python -m bench.<group>.<name>`` (groups: quality, train, serve, probe,
render); reports go to bench/results/*.json and are rendered into docs/ by bench.render."""
