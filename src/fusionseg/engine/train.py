"""``fusionseg.train(cfg)``: one training run, alone or under ``torchrun``.

The run itself is :class:`~fusionseg.engine.trainer.Trainer`; this module joins and leaves the process group
around it. The engine's rooms, one concern each:

* ``config.py``   TrainConfig, TOML recipes, ``--set``, the ``fusionseg train`` flags, resume comparisons
* ``sampling.py`` datasets and vocabulary, cached feature pools, step plans, crops, class choice
* ``trainer.py``  Trainer: setup, the step, validation, checkpoints; the loss and the learning-rate schedule
* ``distributed.py`` torchrun ranks, the process group, DistributedDataParallel
* ``state.py``    state.pt (weights, optimiser, RNG states), checkpoint writes that keep the previous one
* ``encoders.py`` frozen encoders for training, with the offline download hint
* ``plots.py``    metrics.png
* ``metrics.py`` / ``evaluate.py``  IoU arithmetic and the evaluation protocols

Determinism: the batch of step ``s`` (scale, images, views, crop, class names) is drawn from a random
generator seeded by ``(seed, s)`` alone, so a resumed run, a run under ``torchrun`` (each rank takes its slice
of the same global batch) and a run without the feature cache (``cache = false``: the frozen encoder runs
every step on the same crops) all see the same batches as one uninterrupted process.
"""
from __future__ import annotations

from pathlib import Path

import torch

# The names below were all defined here once; scripts, benchmarks and tests import them from this module.
from .config import (RUNTIME_KEYS, TrainConfig, config_differences, config_keys, dump_config,  # noqa: F401
                     load_config_file, make_config, parse_set)
from .distributed import Dist, init_distributed  # noqa: F401
from .encoders import build_encoder_for_training  # noqa: F401
from .plots import plot_metrics  # noqa: F401
from .sampling import (BenchmarkSplit, Plan, _global_masks, _mask_lut, _Pool, _UncachedSteps,  # noqa: F401
                       build_vocabulary, choose_classes, default_scales, gather_batch, make_step_plan, open_datasets,
                       plan_batch, step_rng)
from .state import CONFIG_FILE, STATE_FILE, CheckpointWriteError, load_state, save_state  # noqa: F401
from .trainer import Trainer, TrainError, bce_terms, lr_at, validate  # noqa: F401


def train(cfg: TrainConfig) -> Path:
    """Run a training job; returns the path of ``final.safetensors``. Works alone or under ``torchrun``."""
    from ..runtime import tune_malloc
    tune_malloc()  # CPU speed: the encoder's and head's large buffers reused from the heap
    dist, device = init_distributed(cfg.device)
    try:
        final = Trainer(cfg, dist, device).run()
        if dist.enabled:  # every rank done (rank 0 writes last) before the group is torn down: a rank that
            dist.barrier()  # tore down while its peer still worked aborted once in gloo ("terminate called")
        return final
    finally:
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
