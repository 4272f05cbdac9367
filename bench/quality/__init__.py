"""Quality benchmarks: accuracy of every method against HF PEFT and the baselines on real data."""
