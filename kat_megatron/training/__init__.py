"""Training loops, optimizer set-up, checkpointing and metrics."""
