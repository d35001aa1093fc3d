"""marble-lightning: multi-reward RL fine-tuning of diffusion models with MARBLE on Lightning.

Importing the package registers :class:`~marble_lightning.strategies.MarbleDDPStrategy` as
Lightning's ``"ddp_spawn"`` / ``"ddp_fork"`` (and ``"marble_ddp_spawn"`` / ``"marble_ddp_fork"``):
the same DDP, plus the training state (step counters, coefficients, callbacks) returned to the
main process after ``fit``.
"""

from marble_lightning.strategies import register_strategies

register_strategies(override_builtin=True)
