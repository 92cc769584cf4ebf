"""Reading the JSON files users write by hand (config.json, multidatabackend.json, …).

SimpleTuner's documentation shows JSON with trailing commas (``"Attention",\n]``), and users copy
it. We accept trailing commas, and report any other syntax error as one sentence with the line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stune.errors import ConfigError


def _strip_trailing_commas(text: str) -> str:
    out: list[str] = []
    in_string = escaped = False
    for i, ch in enumerate(text):
        if in_string:
            out.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
            continue
        if ch == '"':
            in_string = True
        elif ch == ",":
            rest = text[i + 1 :].lstrip()
            if rest[:1] in ("]", "}"):
                continue
        out.append(ch)
    return "".join(out)


def read_json(path: str | Path, what: str = "file") -> Any:
    """Parse a hand-written JSON file; a syntax error is a :class:`ConfigError` naming the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"The {what} {path} does not exist; create it or fix the path.") from None
    except OSError as exc:
        raise ConfigError(f"The {what} {path} cannot be read ({exc.strerror}).") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"The {what} {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8.") from None
    except ValueError:  # a NUL byte in the path
        raise ConfigError(f"The {what} path {str(path)[:80]!r} contains a NUL character; fix the path.") from None
    try:
        return json.loads(_strip_trailing_commas(text))
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"The {what} {path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}."
        ) from None
    except RecursionError:
        raise ConfigError(f"The {what} {path} nests lists or objects too deeply to be read; flatten it.") from None


def read_json_option(value: Any, option: str) -> Any:
    """An option that takes JSON (``webhook_config``, ``publishing_config``): the object or list
    itself, inline JSON text, or the path of a JSON file. Mistakes are ConfigErrors naming ``option``."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if not text.startswith(("{", "[")):
        return read_json(text, f"{option} file")
    try:
        return json.loads(_strip_trailing_commas(text))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{option} is not valid JSON ({exc.msg}); give a JSON object, list or file.") from None
    except RecursionError:
        raise ConfigError(f"{option} nests lists or objects too deeply to be read; flatten it.") from None
