"""Data: reading/writing volumes (``io``), the BTCV label schema (``labels``), dataset folders (``datasets``),
MONAI transform pipelines (``transforms``), the sample CT (``sample``) and synthetic phantoms (``phantom``).

Submodules are imported explicitly (``from logonet.data import io``) so that ``import logonet.data`` stays cheap.
"""
from __future__ import annotations
