"""The Slicer side's one error type and the one boundary where errors become what the user sees.

- :class:`LoGoNetError`: a problem the user can act on (a missing input, a broken model folder, a worker that
  failed with its reason). Raised everywhere in LoGoNetLib and the module libraries; its message is shown as is.
- :func:`from_core`: the core's :class:`logonet.errors.UserError` (raised by the torch-free core modules the
  Slicer side calls in its own process: the card schema, dataset discovery, label names) becomes a
  :class:`LoGoNetError` with the same message.
- :func:`error_boundary`: wraps every action a widget starts. A :class:`LoGoNetError` becomes one message; any
  other exception is a bug: one message that says so, and its traceback in Slicer's log (and in the dialog's
  details), never swallowed silently.

Nothing here imports Qt or Slicer.
"""
from __future__ import annotations

import contextlib
import logging
import traceback
from typing import Callable, Iterator, Optional

from logonet.errors import UserError

LOG = logging.getLogger("LoGoNet")

#: ``show(message, details)``: how a widget shows an error (an error dialog in Slicer, a list in the tests).
Show = Callable[[str, Optional[str]], None]


class LoGoNetError(Exception):
    """A failure to show the user as is: the message says what went wrong and what to do; no traceback."""


@contextlib.contextmanager
def from_core() -> Iterator[None]:
    """Turn the core's ``UserError`` into :class:`LoGoNetError` (same message) for the code inside the block."""
    try:
        yield
    except UserError as error:
        raise LoGoNetError(str(error)) from error


def failure_message(error: BaseException, what: str) -> str:
    """The message for an error caught where a run ends (a worker's completion callback): a
    :class:`LoGoNetError` as is; anything else is a bug, logged with its traceback and named as ``what``."""
    if isinstance(error, LoGoNetError):
        return str(error)
    LOG.error("%s", what, exc_info=(type(error), error, error.__traceback__))
    return f"{what}: {error}"


@contextlib.contextmanager
def error_boundary(what: str, show: Show) -> Iterator[None]:
    """The one place where an action's error reaches the user. ``what`` names the action for a bug's message
    ("Segmentation could not start"). Nothing propagates out of the block: the widget stays usable."""
    try:
        yield
    except LoGoNetError as error:
        LOG.warning("%s: %s", what, error)
        show(str(error), None)
    except Exception as error:  # a bug: keep its traceback
        LOG.exception("%s", what)
        show(f"{what}: {error}", traceback.format_exc())


__all__ = ["LOG", "LoGoNetError", "from_core", "failure_message", "error_boundary"]
