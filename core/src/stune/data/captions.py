"""Caption edits a dataset asks for: SimpleTuner's ``caption_filter_list`` and ``caption_shuffle``.

Both run once, when the dataset is scanned, so the text cache holds exactly the captions that are
trained on and ``st-train check`` shows them.
"""

from __future__ import annotations

import random
import re
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from stune.errors import ConfigError

if TYPE_CHECKING:
    from stune.data.config import CaptionShuffle, ResolvedDataset

_SEPARATORS = {"comma": ",", "space": " ", "period": "."}
_JOINERS = {"comma": ", ", "space": " ", "period": ". "}


def edited_captions(captions: list[str], ds: ResolvedDataset) -> list[str]:
    """``captions`` after the dataset's filter list, then with its shuffled variants."""
    rules = filter_rules(ds)
    if rules:
        captions = [apply_filters(c, rules) for c in captions]
        captions = [c for c in captions if c] or [""]
    shuffle = ds.entry.caption_shuffle
    if shuffle is not None and shuffle.enable:
        seed = shuffle.seed if shuffle.seed is not None else ds.caption_seed
        captions = [v for c in captions for v in shuffled_variants(c, shuffle, seed)]
    return captions


def filter_rules(ds: ResolvedDataset) -> list[tuple[re.Pattern[str], str]]:
    """(pattern, replacement) pairs of ``caption_filter_list``: a list, or a text file of entries."""
    given = ds.entry.caption_filter_list
    if not given:
        return []
    if isinstance(given, str):
        path = Path(given)
        if not path.is_file():
            raise ConfigError(
                f"Dataset `{ds.id}`: caption_filter_list {given!r} is not a file; give a list of strings or the path "
                "of a text file with one entry per line."
            )
        given = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [_rule(entry, ds.id) for entry in given]


def _rule(entry: str, dataset_id: str) -> tuple[re.Pattern[str], str]:
    # `s/pattern/replacement/` substitutes; any other entry is removed, as a regular expression
    # when it is one, else as the literal text.
    if entry.startswith("s/") and entry.count("/") >= 3:
        body = entry[2:].rstrip("/") if entry.endswith("/") else entry[2:]
        pattern, _, replacement = body.partition("/")
        try:
            return re.compile(pattern), replacement
        except re.error as exc:
            raise ConfigError(
                f"Dataset `{dataset_id}`: caption_filter_list entry {entry!r} is not a valid substitution ({exc})."
            ) from None
    try:
        return re.compile(entry), ""
    except re.error:
        return re.compile(re.escape(entry)), ""


def apply_filters(caption: str, rules: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, replacement in rules:
        caption = pattern.sub(replacement, caption)
    caption = re.sub(r"\s+([,.])", r"\1", " ".join(caption.split()))  # no stray spaces left before separators
    caption = re.sub(r"([,.])(?:[,.]|\s)*[,.]", r"\1", caption)  # nor empty tags between separators
    return caption.strip(" ,.")


def shuffled_variants(caption: str, shuffle: CaptionShuffle, seed: int) -> list[str]:
    """The caption (when include_original) and ``count`` shuffles of its tags after ``position_start``.

    The shuffles depend only on the seed and the caption text, so every run (and every process)
    caches the same variants."""
    tags = [t.strip() for t in caption.split(_SEPARATORS[shuffle.split_on]) if t.strip()]
    if len(tags) < shuffle.position_start + 2:  # nothing to reorder
        return [caption]
    rng = random.Random(seed * 1_000_003 + zlib.crc32(caption.encode("utf-8")))
    fixed, rest = tags[: shuffle.position_start], tags[shuffle.position_start :]
    variants = [caption] if shuffle.include_original else []
    for _ in range(shuffle.count):
        order = rest[:]
        rng.shuffle(order)
        variants.append(_JOINERS[shuffle.split_on].join(fixed + order))
    return variants
