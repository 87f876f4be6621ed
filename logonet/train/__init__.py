"""Training machinery shared by fine-tuning (``logonet finetune``) and SSL pre-training (``logonet pretrain``).

- :mod:`logonet.train.engine`: the generic loop (device, AMP, AdamW + warmup/cosine, checkpoints, resume,
  signals, seeds, metrics CSV/plot, progress events, torchrun/DDP).
- :mod:`logonet.train.warmstart`: initialise a network from another model card (``--init``).
- :mod:`logonet.train.finetune`: the supervised fine-tuning command.
"""
from __future__ import annotations
