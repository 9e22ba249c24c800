"""Stage 2, training one cell: :mod:`~ltbench.training.trainer` (``run`` and the ``Trainer``),
:mod:`~ltbench.training.step` (views × paths and the loss of a step), :mod:`~ltbench.training.schedule`
(learning rate), :mod:`~ltbench.training.evaluation` (test accuracy), :mod:`~ltbench.training.checkpoint`
(checksummed resumable checkpoints, random states), :mod:`~ltbench.training.celldir` (the output
directory's lock and writability), :mod:`~ltbench.training.distributed` (torchrun / DDP) and
:mod:`~ltbench.training.gpus` (per-process GPU claiming)."""
