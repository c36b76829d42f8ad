"""Step-SRPO / GRPO reinforcement learning: prompts, rewards, advantages, rollouts, the trainer.

Generation comes from `kat_megatron.inference` (the rollout engine)."""
