"""A project folder as ``st-train`` reads it, edited in place by ``st-train configure`` and the web
interface (``stune-web``): ``config/config.json``, the dataset list (``multidatabackend.json``) and
the LyCORIS config.

Editing never loses what the user wrote: a key keeps its spelling and place (SimpleTuner's
``--learning_rate`` stays ``--learning_rate``), a value nobody changed stays as written (``"4e-5"``
stays a string), a key stune does not know (a plugin that is not installed) is kept, and a key equal
to its default is never pruned. A file whose content would not change is not rewritten at all, so it
stays byte for byte what it was; a rewritten one keeps its indentation.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from stune.config import DEFAULT_CONFIG_PATHS, DEFAULT_DATA_BACKEND_CONFIG, normalise_key
from stune.jsonfile import read_json

CONFIG_FILE = DEFAULT_CONFIG_PATHS[0]  # config/config.json
DATASETS_FILE = DEFAULT_DATA_BACKEND_CONFIG  # config/multidatabackend.json
LYCORIS_FILE = Path("config/lycoris_config.json")

#: The LyCORIS configs of the seeds' HiDream quickstarts (the same file in all three languages).
LYCORIS_PRESETS: dict[str, dict[str, Any]] = {
    "lokr-attention": {
        "title": "LoKr on the attention layers, factor 16",
        "source": "the HiDream quickstart's config/lycoris_config.json (any family: `Attention` maps to its class)",
        "settings": {
            "algo": "lokr",
            "multiplier": 1.0,
            "linear_dim": 16384,
            "linear_alpha": 1,
            "full_matrix": True,
            "use_scalar": True,
            "factor": 16,
            "apply_preset": {"target_module": ["Attention"], "module_algo_map": {"Attention": {"factor": 16}}},
        },
    },
    "lokr-hidream-ffs": {
        "title": "LoKr on attention and the feed-forward layers outside the experts, factor 16 (HiDream)",
        "source": "the HiDream quickstart's second config/lycoris_config.json (module names of HiDream's blocks)",
        "settings": {
            "algo": "lokr",
            "multiplier": 1.0,
            "linear_dim": 16384,
            "linear_alpha": 1,
            "full_matrix": True,
            "use_scalar": True,
            "factor": 16,
            "apply_preset": {
                "name_algo_map": {
                    "double_stream_blocks.*.block.attn*": {"factor": 16},
                    "double_stream_blocks.*.block.ff_t*": {"factor": 16},
                    "double_stream_blocks.*.block.ff_i.shared_experts*": {"factor": 16},
                    "single_stream_blocks.*.block.attn*": {"factor": 16},
                    "single_stream_blocks.*.block.ff_i.shared_experts*": {"factor": 16},
                },
                "use_fnmatch": True,
            },
        },
    },
}


def read_document(path: Path, what: str = "file") -> tuple[Any, str | None]:
    """The parsed content of a JSON file as written (keys in their spelling and order) and its text;
    ``(None, None)`` when it does not exist. Syntax errors are a ConfigError naming the line."""
    if not path.is_file():
        return None, None
    return read_json(path, what), path.read_text(encoding="utf-8")


def save_json(path: Path, data: Any, previous_text: str | None = None) -> bool:
    """Write ``data`` to ``path`` unless the file already holds exactly it (then it is left byte for
    byte as it is). Returns whether the file was written. The write is atomic."""
    if previous_text is None and path.is_file():
        previous_text = path.read_text(encoding="utf-8")
    if previous_text is not None:
        try:
            held = read_json_text(previous_text)
        except ValueError:
            held = None  # a broken file is replaced by the content asked for
        if held == data and _same_types(held, data):
            return False
    text = json.dumps(data, indent=_indent_of(previous_text), ensure_ascii=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return True


def read_json_text(text: str) -> Any:
    """Parse JSON text the way :func:`stune.jsonfile.read_json` does (trailing commas allowed)."""
    from stune.jsonfile import _strip_trailing_commas

    return json.loads(_strip_trailing_commas(text))


def _same_types(a: Any, b: Any) -> bool:
    # 1 == 1.0 == True in Python; a file holding "1" must be rewritten when asked to hold true.
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same_types(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same_types(x, y) for x, y in zip(a, b))
    return True


def _indent_of(text: str | None) -> int | str:
    if text:
        match = re.search(r"^[{\[][^\n]*\n([ \t]+)\S", text, flags=re.MULTILINE)
        if match:
            indent = match.group(1)
            return len(indent) if set(indent) == {" "} else indent
    return 2


def edit_config(
    written: dict[str, Any],
    changes: dict[str, Any],
    removed: Iterable[str] = (),
    canonical: Callable[[str], str] = normalise_key,
) -> dict[str, Any]:
    """``written`` (a config as in its file) with ``changes`` applied and ``removed`` keys dropped.

    A key is matched by its canonical name (``canonical``: leading ``--`` stripped, an alias mapped
    to its option), so a change keeps the file's spelling and place of the key; a new key goes at
    the end; every other key is kept as it is."""
    spelled: dict[str, str] = {}
    for key in written:
        spelled.setdefault(canonical(key), key)
    out = dict(written)
    for key in removed:
        found = spelled.get(canonical(key))
        if found is not None:
            out.pop(found, None)
    for key, value in changes.items():
        out[spelled.get(canonical(key), normalise_key(key))] = value
    return out
