"""Exceptions the CLI turns into one readable sentence and exit status 2."""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix (bad key, bad value, missing folder, missing plugin).

    The message is one sentence that names the thing and the fix. The CLI prints it without a
    traceback and exits with status 2.
    """

    def __init__(self, message: str = "", *args: object) -> None:
        # A message quotes what the user wrote, which may hold line breaks or NUL bytes (a key
        # "\n"): they are shown escaped, so the message stays one line a terminal prints as is.
        text = str(message)
        if any(ord(c) < 32 or 0xD800 <= ord(c) <= 0xDFFF for c in text):
            text = "".join(repr(c)[1:-1] if ord(c) < 32 or 0xD800 <= ord(c) <= 0xDFFF else c for c in text)
        super().__init__(text, *args)


class ConfigError(UserError):
    """A configuration key or value is wrong, or two options cannot be combined."""


class PluginNotInstalled(UserError):
    """A plugin was asked for (``--plugin``, ``model_family`` or a plugin-owned key) but is not installed."""


class PluginLoadError(UserError):
    """An installed plugin failed to import or to register."""
