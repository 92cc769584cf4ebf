"""stune: a small-core, plugin-based trainer for diffusion transformers.

Importing this package is cheap (no torch): it exposes the hook marker plugins use, the option
base class and the user-facing error type. Heavy modules are imported by the code that needs them.
"""

from __future__ import annotations

from stune.errors import ConfigError, PluginLoadError, PluginNotInstalled, UserError
from stune.hookspecs import hookimpl
from stune.options import Options

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Options",
    "PluginLoadError",
    "PluginNotInstalled",
    "UserError",
    "__version__",
    "hookimpl",
]
