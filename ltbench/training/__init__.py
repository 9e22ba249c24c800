"""Stage 2, training one cell: the :class:`~ltbench.training.trainer.Trainer`, its step (views × paths
and the loss), checkpoints, multi-GPU (torchrun/DDP) and per-process GPU claiming."""
