"""Values of a configuration that reach the file system, checked before anything is written.

A configuration may come from a web page, so every name in it is hostile until checked. A *name*
(a dataset id, a tracker run name) becomes one file or folder name inside a folder stune owns: it
must be one plain path component, so that nothing lands outside ``output_dir`` and the cache
folders. A *folder option* (``output_dir``, ``cache_dir``) is the user's own choice of place, but
must be a folder (not an existing file) and a path the operating system accepts. Only the
standard library here: the checks run in ``st-train check`` before torch is imported.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from stune.errors import ConfigError

#: room for what stune adds around a name (``.stune-index-<id>.json``) under the usual 255-byte limit
MAX_NAME_BYTES = 200
#: the longest single path component file systems accept (ext4, APFS, NTFS)
MAX_COMPONENT_BYTES = 255
#: options holding a file, folder or Hub id: each part of their value must fit in a file name
_PATH_OPTION = re.compile(
    r"(.+_dir|cache_dir_.+|.+_path|.+_or_path|.+_config|.+_library|.+_script|.+_input|.+_autoencoder|"
    r"resume_from_checkpoint|init_lora|hub_model_id)"
)
#: folders stune creates and writes into
FOLDER_OPTIONS = ("output_dir", "cache_dir", "cache_dir_vae", "cache_dir_text")


def name_problem(value: str) -> str | None:
    """Why ``value`` cannot be one file or folder name (None when it can)."""
    if not value.strip():
        return "is empty"
    if "\x00" in value:
        return "contains a NUL character"
    if "/" in value or "\\" in value:
        return "contains a path separator (/ or \\)"
    if value.strip() in (".", ".."):
        return "names a folder (. or ..)"
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        return "contains a control character"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid Unicode"
    if size > MAX_NAME_BYTES:
        return f"is {size} bytes long, more than the {MAX_NAME_BYTES} a file name may use here"
    return None


def check_name(value: str, what: str) -> str:
    """``value`` if it can be a file name, else a :class:`ConfigError` naming ``what``."""
    problem = name_problem(value)
    if problem is not None:
        raise ConfigError(f"{what} {value[:80]!r} {problem}; use letters, digits, spaces, dashes and dots.")
    return value


def text_problem(value: str, path_like: bool) -> str | None:
    if "\x00" in value:
        return "contains a NUL character, which no file name or prompt may hold; remove it"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode (it holds a lone surrogate); retype it"
    if path_like:
        long = [part for part in re.split(r"[/\\]", value) if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES]
        if long:
            return (
                f"has a part {len(long[0].encode('utf-8'))} bytes long, more than the {MAX_COMPONENT_BYTES} "
                "a file or folder name may have; shorten it"
            )
        if len(value.encode("utf-8")) > 4000:
            return "is longer than any path the system accepts; shorten it"
    return None


def check_option_strings(values: dict[str, Any]) -> None:
    """Every text option (``{option: value}`` as read, before any validator opens a file it names):
    no NUL, valid Unicode; file and folder options: parts that fit in a file name."""
    for key, value in values.items():
        path_like = bool(_PATH_OPTION.fullmatch(key))
        texts = (
            [value]
            if isinstance(value, str)
            else [v for v in value if isinstance(v, str)]
            if isinstance(value, list)
            else []
        )
        for text in texts:
            problem = text_problem(text, path_like)
            if problem is not None:
                shown = repr(text) if len(text) <= 60 else f"{text[:60]!r}… ({len(text)} characters)"
                raise ConfigError(f"Option `{key}` = {shown} {problem}.")


def check_folder(path: Path, option: str) -> None:
    """``path`` can be a folder stune writes into: it, and every folder above it, is not a file."""
    for folder in (path, *path.parents):
        try:
            is_file = folder.exists() and not folder.is_dir()
        except OSError as exc:  # a name longer than the file system takes, a folder we may not look into
            raise ConfigError(f"Option `{option}` = {str(path)[:80]!r} cannot be used ({exc.strerror}).") from None
        if is_file:
            where = "is" if folder == path else f"lies under {folder}, which is"
            raise ConfigError(
                f"Option `{option}` = {str(path)!r} {where} a file, not a folder; point it at a folder "
                "(it is created if missing)."
            )
