"""Small GUI helpers shared by both widgets. ``qt`` is passed in (or imported lazily), so the helpers can be
tested with PyQt5 and never import Qt when the logics are used headless."""
from __future__ import annotations

from typing import Callable


def ask_without_busy_cursor(question: str, confirm: Callable[[str], bool], application=None) -> bool:
    """Ask ``question`` with the normal cursor: every override cursor (a busy cursor set by
    ``tryWithErrorDisplay(waitCursor=True)`` or a running install) is taken down while the dialog is open and
    put back afterwards. A question under a busy cursor looks like a hang and invites a second click."""
    if application is None:
        import qt

        application = qt.QApplication
    saved = []
    while application.overrideCursor() is not None:
        saved.append(application.overrideCursor().shape())
        application.restoreOverrideCursor()
    try:
        return bool(confirm(question))
    finally:
        for shape in reversed(saved):
            application.setOverrideCursor(shape)


def organ_summary(entry) -> str:
    """'12 organs: spleen, ...' for a catalog entry (the count and names come from its model card)."""
    labels = entry.labels if entry is not None else []
    if not labels:
        return ""
    return f"{len(labels)} organs: " + ", ".join(str(label.get("name")) for label in labels)


__all__ = ["ask_without_busy_cursor", "organ_summary"]
