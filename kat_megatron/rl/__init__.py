"""Step-SRPO / GRPO reinforcement learning: rollout engine, rewards, advantages, trainer, serve."""
