"""Training speed benchmarks: one step against HF PEFT and the floor, several GPUs, time to accuracy."""
