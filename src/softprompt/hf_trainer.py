"""The README's path to the Trainer adapter; it lives in `softprompt.training.hf_trainer`."""

from .training.hf_trainer import ExampleCollator, TrainerModel

__all__ = ["ExampleCollator", "TrainerModel"]
