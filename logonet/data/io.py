"""Deprecated name of :mod:`logonet.data.volumes` (it shadowed the standard library's ``io``); kept for one release
so that older imports keep working. Import ``logonet.data.volumes`` instead."""
from __future__ import annotations

from .volumes import *  # noqa: F401,F403
from .volumes import __getattr__, sha256_file  # noqa: F401  (lazy MONAI classes; the model card's checksum)
