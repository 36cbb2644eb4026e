"""Training engine shared by every head: loop, schedules, checkpoints, distributed setup."""
