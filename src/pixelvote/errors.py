"""One error base for everything a user can cause: bad data, bad files, bad options.

The CLI turns a :class:`PixelvoteError` into a one-paragraph message and exit code 2; the
message names the file (when there is one), the problem and the fix.
"""

from __future__ import annotations

from pathlib import Path


class PixelvoteError(Exception):
    """Base for errors caused by input, configuration or files, not by a bug."""

    def __init__(self, problem: str, *, path: str | Path | None = None, fix: str | None = None) -> None:
        self.problem = problem
        self.path = None if path is None else str(path)
        self.fix = fix
        parts = [f"{self.path}: {problem}" if self.path else problem]
        if fix:
            parts.append(f"Fix: {fix}")
        super().__init__(" ".join(parts))


class DataError(PixelvoteError):
    """A dataset, image, mask or manifest that cannot be used."""


class CheckpointError(PixelvoteError):
    """A run folder or weights file that is missing, corrupt or incompatible."""


class ConfigError(PixelvoteError):
    """An option or configuration value that is unknown or out of range."""


def did_you_mean(value: str, choices: list[str] | tuple[str, ...]) -> str:
    """A 'did you mean …' hint for an unknown option (MONAI's look_up_option style)."""
    import difflib

    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"expected one of {', '.join(repr(c) for c in choices)} but got {value!r}.{hint}"
