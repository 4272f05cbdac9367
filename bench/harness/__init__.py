"""What every benchmark shares.

    report      where results go, versions and device, JSON reports written atomically and
                merged by row, quality rows in worker processes, rerun commands
    shapes      the one table of model shapes, build_base, the benchmarks' tokenizer
    timing      the one timer: warm-up, median of timed windows, device sync, peak memory
    steps       one training step of each side (ours, HF PEFT, the frozen floor), methods at
                equal sizes on both sides
    baselines   the training runs a quality row compares: ours through run_training, HF PEFT,
                the linear probe and full fine-tuning on one loop
    load        the HTTP load generators (the checked load-and-faults mix; closed-loop
                throughput clients) and the server helpers they use
"""
