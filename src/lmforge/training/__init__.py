"""Training: optimizers and schedules, checkpoints, the trainer."""
