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
    regions.py      views of the base with its blocks compiled / checkpointed (training forwards)
    attention.py    the attention kernels a training forward may use

Nothing is imported here: `model.py` and `forward.py` use `regions` and `attention`, and the
modules above import `model.py`; importing them from this file would close that loop.
"""
