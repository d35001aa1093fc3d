"""The offline toy world: procedural scenes, prompts, an exact detector and a tiny base model.

Submodules: :mod:`.world` (scene specs and rendering), :mod:`.prompts` (templates, parser,
train / held-out splits), :mod:`.detector` (:class:`ToyDetector`), :mod:`.text_encoder`,
:mod:`.backbone` (:class:`ToyBackbone`), :mod:`.pretrain` (the base-model pretraining script),
:mod:`.quality` (:class:`QualityReward`) and :mod:`.train_clip` (the tiny CLIP model).
"""
