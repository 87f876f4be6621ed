"""``python -m logonet ...`` (what the Slicer modules launch with PythonSlicer)."""
from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
