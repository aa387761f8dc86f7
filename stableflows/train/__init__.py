"""Training: the loop, objectives, EMA, checkpoints, evaluation and figures.

    from stableflows.config import RunConfig
    from stableflows.train import train
    result = train(RunConfig())          # digits Glow; outputs under a new runs/glow-digits-<UTC time>
    result.test_bpd, result.steps_per_s
"""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .ema import EMA
from .evaluate import draw_samples, evaluate, load_flow
from .loop import TrainingDiverged, TrainingInterrupted, TrainResult, train, validate_config
from .objectives import Batch, MaximumLikelihood, Objective

__all__ = [
    "train", "TrainResult", "TrainingDiverged", "TrainingInterrupted", "validate_config",
    "Objective", "MaximumLikelihood", "Batch", "EMA",
    "save_checkpoint", "load_checkpoint", "CheckpointError",
    "evaluate", "load_flow", "draw_samples",
]
