"""LoGoNet: local + global 3-D segmentation with masked self-supervised pre-training.

The core package never imports Slicer or Qt; it runs in a terminal, a batch job, CI or a GPU server.
"""
from __future__ import annotations

__version__ = "0.1.0"
