"""stune: a small-core, plugin-based trainer for diffusion transformers.

Importing this package is cheap (no torch): it exposes the hook marker plugins use, the option
base class and the user-facing error type. Heavy modules are imported by the code that needs them.
"""

from __future__ import annotations

import logging

from stune.errors import ConfigError, PluginLoadError, PluginNotInstalled, UserError
from stune.hookspecs import hookimpl
from stune.options import Options

__version__ = "0.1.0"


class _NoTorchvisionNotice(logging.Filter):
    """stune deliberately does without torchvision (PIL + numpy do the image work); transformers
    announces its PIL fallback for CLIP's image processor on every import, which only confuses."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionNotice())

__all__ = [
    "ConfigError",
    "Options",
    "PluginLoadError",
    "PluginNotInstalled",
    "UserError",
    "__version__",
    "hookimpl",
]
