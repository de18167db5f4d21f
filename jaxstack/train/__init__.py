"""Training: the jitted step, checkpoints that resume exactly, metrics, and the SFT job.

from jaxstack.train import TrainJobConfig, run_train
summary = run_train(TrainJobConfig(steps=50))   # writes runs/train_tiny/...
"""

from jaxstack.train.checkpoint import Checkpointer, CheckpointError, abstract_state
from jaxstack.train.loop import LoopParts, NonFiniteLossError, RunConfig, run_loop
from jaxstack.train.metrics import MetricsLogger, plot_metrics, progress_bar, read_metrics
from jaxstack.train.step import (
    OptimConfig,
    TrainState,
    init_train_state,
    learning_rate_schedule,
    lm_loss_sums,
    make_optimizer,
    make_train_step,
    make_update,
    merge_trainable,
    place_batch,
    split_frozen,
)
from jaxstack.train.trainer import (
    DataSection,
    ModelSection,
    TrainJobConfig,
    build_data,
    build_model,
    evaluate_arithmetic,
    run_train,
)

__all__ = [
    "CheckpointError",
    "Checkpointer",
    "LoopParts",
    "RunConfig",
    "DataSection",
    "MetricsLogger",
    "ModelSection",
    "NonFiniteLossError",
    "OptimConfig",
    "TrainJobConfig",
    "TrainState",
    "abstract_state",
    "build_data",
    "build_model",
    "evaluate_arithmetic",
    "init_train_state",
    "learning_rate_schedule",
    "lm_loss_sums",
    "make_optimizer",
    "make_train_step",
    "make_update",
    "merge_trainable",
    "run_loop",
    "split_frozen",
    "place_batch",
    "plot_metrics",
    "progress_bar",
    "read_metrics",
    "run_train",
]
