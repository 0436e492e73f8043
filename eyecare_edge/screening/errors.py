"""The error of a screen run that cannot start."""

from __future__ import annotations

from eyecare_edge.errors import EyecareError


class ScreenError(EyecareError):
    """A screen run that cannot start: bad inputs, questions or output file (message says why)."""
