"""Training: one flat loop (loop.py) for pre-training and chat fine-tuning (sft.py), with its settings
(config.py), optimizers and schedule (optim.py), many processes (dist.py), checkpoints as plain functions
(checkpoint.py) and metrics (metrics.py). A new loop (preference tuning, RL) reuses these modules."""
