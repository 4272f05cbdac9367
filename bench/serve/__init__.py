"""Serving benchmarks: mixed-task batches against HF PEFT, HTTP throughput, the server under load and faults."""
