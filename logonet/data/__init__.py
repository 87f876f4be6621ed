"""Data: reading/writing volumes (``volumes``), the BTCV label schema (``labels``), dataset folders and the one
``dataset.json`` writer (``datasets``), MONAI transform pipelines (``transforms``), the sample CT (``sample``),
synthetic phantoms (``phantom``) and synthetic CTs from real label maps (``synth``).

Submodules are imported explicitly (``from logonet.data import volumes``) so that ``import logonet.data`` stays cheap.
"""
from __future__ import annotations
