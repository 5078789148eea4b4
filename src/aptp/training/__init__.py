"""Training loops and what they share (checkpoints, schedules)."""
