"""pixelvote: pixel-level annotations from image-level labels, with uncertainty and review flags."""

from pixelvote.errors import CheckpointError, ConfigError, DataError, PixelvoteError

__version__ = "0.1.0"
__all__ = ["CheckpointError", "ConfigError", "DataError", "PixelvoteError", "__version__"]
