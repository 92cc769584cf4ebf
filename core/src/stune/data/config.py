"""The dataset list (SimpleTuner's multidatabackend.json), validated without heavy imports."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from stune.config import DEFAULT_DATA_BACKEND_CONFIG, CoreOptions, _one_sentence
from stune.errors import ConfigError
from stune.jsonfile import read_json
from stune.options import AliasChoices, Options, option_names


class DatasetConfig(Options):
    """One entry of the dataset list. Unset values fall back to the global options."""

    id: str = Field(description="Stable name of the dataset (used in cache and report names).")
    type: Literal["local"] = Field("local", description="Storage backend: local folders.")
    dataset_type: Literal["image", "text_embeds"] = Field("image", description="image or text_embeds.")
    disabled: bool = Field(False, validation_alias=AliasChoices("disabled", "disable"), description="Skip it.")
    instance_data_dir: str | None = Field(None, description="Folder of images (relative to the working directory).")
    resolution: float | None = Field(None, gt=0, description="Training resolution; default: the global one.")
    resolution_type: Literal["pixel", "area", "pixel_area"] | None = Field(None, description="Unit of resolution.")
    caption_strategy: Literal["filename", "textfile", "instanceprompt"] | None = Field(
        None, description="Where captions come from; default: the global caption_strategy."
    )
    instance_prompt: str | None = Field(None, description="Caption for caption_strategy=instanceprompt.")
    repeats: int = Field(0, ge=0, description="Extra passes over the images per epoch (0: each image once).")
    cache_dir_vae: str | None = Field(None, description="Folder of this dataset's cached latents.")
    cache_dir: str | None = Field(None, description="Folder of cached text embeddings (text_embeds datasets).")
    default: bool = Field(False, description="The text_embeds dataset used by default.")

    @model_validator(mode="after")
    def _needs(self) -> DatasetConfig:
        if self.dataset_type == "image" and not self.disabled and not self.instance_data_dir:
            raise ValueError(f"`instance_data_dir` is missing: dataset `{self.id}` needs the folder of its images")
        return self


class ResolvedDataset:
    """A dataset entry with the global defaults filled in."""

    def __init__(self, entry: DatasetConfig, config: CoreOptions, text_cache_dir: Path) -> None:
        self.id = entry.id
        self.entry = entry
        self.folder = Path(entry.instance_data_dir or ".")
        self.resolution = float(entry.resolution or config.resolution)
        self.resolution_type = entry.resolution_type or config.resolution_type
        self.caption_strategy = entry.caption_strategy or config.caption_strategy
        self.instance_prompt = entry.instance_prompt or config.instance_prompt
        self.repeats = entry.repeats
        root = Path(config.cache_dir_vae) if config.cache_dir_vae else Path(config.cache_dir) / "vae"
        self.latent_cache_dir = Path(entry.cache_dir_vae) if entry.cache_dir_vae else root / entry.id
        self.text_cache_dir = text_cache_dir
        if self.caption_strategy == "instanceprompt" and not self.instance_prompt:
            raise ConfigError(f"Dataset `{self.id}` uses caption_strategy=instanceprompt; set its instance_prompt.")


def read_dataset_list(config: CoreOptions) -> list[DatasetConfig]:
    path = Path(config.data_backend_config) if config.data_backend_config else DEFAULT_DATA_BACKEND_CONFIG
    if not config.data_backend_config and not path.is_file():
        raise ConfigError(
            f"No dataset list: set data_backend_config to a multidatabackend.json (default {path} does not exist)."
        )
    data = read_json(path, "dataset list (data_backend_config)")
    if not isinstance(data, list):
        raise ConfigError(f"The dataset list {path} must be a JSON list of dataset objects.")
    known = option_names(DatasetConfig)
    entries = []
    for index, raw in enumerate(data):
        if not isinstance(raw, dict):
            raise ConfigError(f"Entry {index} of {path} is not a JSON object.")
        name = raw.get("id", f"#{index}")
        for key in raw:
            if key not in known:
                close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
                hint = f"; did you mean `{close[0]}`?" if close else "."
                raise ConfigError(f"Dataset `{name}` in {path} has an unknown key `{key}`{hint}")
        try:
            entries.append(DatasetConfig.model_validate(raw))
        except ValidationError as exc:
            raise ConfigError(f"Dataset `{name}` in {path}: {_one_sentence(exc)}") from None
    ids = [e.id for e in entries]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ConfigError(f"Dataset id `{duplicates[0]}` appears twice in {path}; ids must be unique.")
    return entries


def resolve_datasets(config: CoreOptions) -> list[ResolvedDataset]:
    """The enabled image datasets, with their cache folders; errors name the dataset and the fix."""
    entries = [e for e in read_dataset_list(config) if not e.disabled]
    text_sets = [e for e in entries if e.dataset_type == "text_embeds"]
    defaults = [e for e in text_sets if e.default] or text_sets[:1]
    if len(defaults) > 1 or len([e for e in text_sets if e.default]) > 1:
        raise ConfigError("More than one text_embeds dataset has default=true; mark only one.")
    if defaults and defaults[0].cache_dir:
        text_dir = Path(defaults[0].cache_dir)
    elif config.cache_dir_text:
        text_dir = Path(config.cache_dir_text)
    else:
        text_dir = Path(config.cache_dir) / "text"
    images = [ResolvedDataset(e, config, text_dir) for e in entries if e.dataset_type == "image"]
    if not images:
        raise ConfigError("The dataset list has no enabled image dataset; add one with instance_data_dir.")
    for ds in images:
        if not ds.folder.is_dir():
            raise ConfigError(f"Dataset `{ds.id}`: the folder {ds.folder} does not exist; fix instance_data_dir.")
    return images
