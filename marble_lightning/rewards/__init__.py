"""Reward models: one file per family, all behind :class:`~marble_lightning.rewards.base.RewardModel`."""
