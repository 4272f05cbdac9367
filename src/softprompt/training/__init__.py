"""The training wing: from a run configuration to a trained prompt folder.

    config.py       TrainConfig (the loop's settings), RunConfig (the run's), YAML / --set
    assemble.py     RunConfig -> examples, task, template, prompt configuration
    order.py        the seeded, length-bucketed batch order and the prefetching stream
    loop.py         train(): step / record / evaluate / checkpoint phases over a TrainState
    checkpoint.py   resumable checkpoints (FSDP 2 gather included)
    logs.py         metrics.jsonl, metrics.json, curves.png, TensorBoard, the progress bar
    evaluate.py     metrics of a task, a saved prompt, a zero-shot manual prompt
    run.py          run_training(): assemble -> loop -> test score (`softprompt train`)
    hf_trainer.py   the transformers.Trainer adapter

How a training forward runs the frozen base (its blocks compiled or checkpointed, its attention
kernels) is the model's business, not the loop's: `softprompt.regions` and `softprompt.attention`,
used by `model.py` and `forward.py`. So the server, which imports the model, imports nothing of
this package (tests/test_layout.py checks it).
"""
