"""``python -m fastattn.train``: the training command, kept at this name for the README
and existing imports. The code lives in ``fastattn.models`` (``train``: the loop;
``train_config``, ``optim``, ``checkpoint``, ``metrics``; ``sample``: sampling).
"""
import sys

from fastattn.models.checkpoint import (CheckpointError, load_checkpoint, load_model,
                                        save_checkpoint)
from fastattn.models.metrics import read_log, sink_summary
from fastattn.models.optim import Precision, choose_precision, configure_optimizer, lr_at
from fastattn.models.sample import add_sample_arguments, sample, sample_main
from fastattn.models.train import main, train, train_main
from fastattn.models.train_config import (DEFAULTS, TRAIN_PRESETS, add_train_arguments,
                                          parse_train_args, resolve_args)

__all__ = ["DEFAULTS", "TRAIN_PRESETS", "CheckpointError", "Precision",
           "add_sample_arguments", "add_train_arguments", "choose_precision",
           "configure_optimizer", "load_checkpoint", "load_model", "lr_at", "main",
           "parse_train_args", "read_log", "resolve_args", "sample", "sample_main",
           "save_checkpoint", "sink_summary", "train", "train_main"]

if __name__ == "__main__":
    sys.exit(main())
