"""The one exception a training run raises for a reason a user can act on."""

from __future__ import annotations


class TrainingError(Exception):
    """Training could not start or finish; the message says why in words (no stack trace needed)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
