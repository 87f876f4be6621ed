"""Masked self-supervised pre-training (paper section 2): sequence masking, multi-clusterer pseudo-labels,
the cross-entropy loss of Eq. 4-5 and the ``logonet pretrain`` command.

- :mod:`logonet.ssl.masking`: anchors + chains of masked slices, random patch zeroing.
- :mod:`logonet.ssl.pseudolabels`: N MiniBatchKMeans clusterers on slice intensities, saved as plain arrays.
- :mod:`logonet.ssl.loss`: mean over masked slices and clusterers of -log softmax(logits / tau)[target].
- :mod:`logonet.ssl.pretrain`: the command (backbone + :mod:`logonet.nets.pretrain_head`).
"""
from __future__ import annotations
