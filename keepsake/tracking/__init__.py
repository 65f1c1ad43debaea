"""Experiment tracking: init(), experiments, checkpoints, listing."""
