"""Exceptions the CLI turns into one readable sentence and exit status 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad key, bad value, missing folder, missing plugin).

    The message is one sentence that names the thing and the fix. The CLI prints it without a
    traceback and exits with status 2.
    """


class ConfigError(UserError):
    """A configuration key or value is wrong, or two options cannot be combined."""


class PluginNotInstalled(UserError):
    """A plugin was asked for (``--plugin``, ``model_family`` or a plugin-owned key) but is not installed."""


class PluginLoadError(UserError):
    """An installed plugin failed to import or to register."""
