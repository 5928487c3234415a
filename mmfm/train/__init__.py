"""The training loop, optimizer and schedule, objectives, metrics and evaluation."""
