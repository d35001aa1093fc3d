"""Lightning callbacks that drive :class:`~marble_lightning.module.MarbleDiffusionModule`.

* :class:`HarmonizationCallback` decides on which steps the module harmonises fresh per-reward
  gradients (a "refresh") and when the final uniform-alpha stage starts.
* :class:`EMACoefficientCallback` smooths the coefficients used between refreshes.
* :class:`PolicyEMACallback` keeps an EMA of the policy LoRA weights (evaluation, export).
* :class:`RewardEvalCallback` scores the policy on held-out prompts at fixed seeds, logs the
  per-reward means and an image grid, and keeps the evaluation history (for plots).
* :class:`EvaluationTableCallback` turns ``marble validate | test`` into the full per-image table
  (CSV, summary, GenEval strict accuracy with a detector).

Each callback validates its arguments in ``__init__`` (``ValueError`` naming the argument and
value), checks the module in ``setup`` and is resumable (``state_dict`` / ``load_state_dict``).
"""

from marble_lightning.callbacks.ema import EMACoefficientCallback
from marble_lightning.callbacks.harmonization import HarmonizationCallback
from marble_lightning.callbacks.policy_ema import PolicyEMACallback
from marble_lightning.callbacks.prompt_table import EvaluationTableCallback
from marble_lightning.callbacks.reward_eval import RewardEvalCallback

__all__ = [
    "EMACoefficientCallback",
    "EvaluationTableCallback",
    "HarmonizationCallback",
    "PolicyEMACallback",
    "RewardEvalCallback",
]
