"""Training: the Trainer and its update, the run's loop, LR, optimizers, EMA, distillation, several processes."""
