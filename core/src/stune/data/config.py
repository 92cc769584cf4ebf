"""The dataset list (SimpleTuner's multidatabackend.json), validated without heavy imports."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stune.config import DEFAULT_DATA_BACKEND_CONFIG, CoreOptions, _one_sentence
from stune.errors import ConfigError
from stune.jsonfile import read_json
from stune.options import AliasChoices, Options, json_list, option_names
from stune.simpletuner import translate_dataset_keys

SKIP_DISCOVERY_WORDS = ("vae", "aspect", "metadata", "text")


class ParquetSource(BaseModel):
    """Where captions (and optionally image sizes) come from for ``parquet`` datasets."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="A .parquet file, or a .jsonl file with one JSON object per line.")
    filename_column: str = Field(
        "id", description="Column naming the image file; default: the global parquet_filename_column, else id."
    )
    caption_column: str = Field(
        "caption",
        description="Column holding the caption (a string or a list); default: the global parquet_caption_column, "
        "else caption.",
    )
    fallback_caption_column: str | None = Field(None, description="Column used when the caption is empty.")
    width_column: str | None = Field(None, description="Column with the image width (skips opening images).")
    height_column: str | None = Field(None, description="Column with the image height.")
    identifier_includes_extension: bool = Field(
        False, description="Whether filename_column values include the file extension."
    )


class CaptionShuffle(BaseModel):
    """SimpleTuner's ``caption_shuffle`` block: deterministic tag-order variants of each caption."""

    model_config = ConfigDict(extra="forbid")

    enable: bool = Field(False, description="Whether to add shuffled variants.")
    count: int = Field(1, ge=1, description="Shuffled variants per caption.")
    seed: int | None = Field(None, description="Seed of the shuffles; default: the run's seed.")
    split_on: Literal["comma", "space", "period"] = Field("comma", description="What separates the tags.")
    position_start: int = Field(0, ge=0, description="Leading tags kept in place.")
    include_original: bool = Field(True, description="Keep the caption as written among the variants.")


class DatasetConfig(Options):
    """One entry of the dataset list. Unset values fall back to the global options."""

    id: str = Field(description="Stable name of the dataset (used in cache and report names).")
    type: Literal["local"] = Field("local", description="Storage backend: local folders.")
    dataset_type: Literal["image", "text_embeds", "eval", "conditioning"] = Field(
        "image", description="image (trained on), eval (held out), conditioning (masks), text_embeds (cache)."
    )
    disabled: bool = Field(False, validation_alias=AliasChoices("disabled", "disable"), description="Skip it.")
    instance_data_dir: str | None = Field(None, description="Folder of images (relative to the working directory).")
    resolution: float | None = Field(None, gt=0, description="Training resolution; default: the global one.")
    resolution_type: Literal["pixel", "area", "pixel_area"] | None = Field(None, description="Unit of resolution.")
    minimum_image_size: float | None = Field(None, ge=0, description="Skip smaller images (unit of resolution).")
    maximum_image_size: float | None = Field(
        None, gt=0, description="Images larger than this are first downsampled to target_downsample_size."
    )
    target_downsample_size: float | None = Field(None, gt=0, description="Size to downsample very large images to.")
    max_upscale_threshold: float | None = Field(
        None,
        ge=0,
        description="Skip images that need upscaling by more than this fraction to fill their bucket (0: no "
        "upscaling; 0.2: up to 1.2×); default: the global option, else no limit.",
    )
    minimum_aspect_ratio: float | None = Field(None, gt=0, description="Skip images narrower than this (w/h).")
    maximum_aspect_ratio: float | None = Field(None, gt=0, description="Skip images wider than this (w/h).")
    crop: bool = Field(False, description="Crop to the target instead of resizing the whole image into it.")
    crop_aspect: Literal["square", "preserve", "closest", "random"] = Field(
        "square", description="Shape of crops: square, the image's own, the closest or a random listed aspect."
    )
    crop_aspect_buckets: list[float] | None = Field(None, description="Aspect ratios (w/h) for closest/random.")
    crop_style: Literal["random", "center", "centre", "corner"] = Field(
        "random", description="Where crops are taken: random (fixed per image), centre, or the bottom-right corner."
    )
    caption_strategy: Literal["filename", "textfile", "instanceprompt", "parquet"] | None = Field(
        None, description="Where captions come from; default: the global caption_strategy."
    )
    instance_prompt: str | None = Field(None, description="Caption for instanceprompt, prefix for prepend.")
    prepend_instance_prompt: bool = Field(False, description="Put instance_prompt before every caption.")
    only_instance_prompt: bool = Field(False, description="Use instance_prompt as the only caption.")
    disable_multiline_split: bool = Field(
        False, description="Keep a caption file whole instead of reading each line as a caption of its own."
    )
    caption_filter_list: list[str] | str | None = Field(
        None,
        description="Strings or regular expressions removed from every caption, or `s/pattern/replacement/` "
        "substitutions; a list, or a text file with one entry per line.",
    )
    caption_shuffle: CaptionShuffle | None = Field(
        None, description="Add shuffled-tag variants of each caption (one is drawn per sample, like multi-captions)."
    )
    repeats: int = Field(0, ge=0, description="Extra passes over the images per epoch (0: each image once).")
    probability: float = Field(1.0, ge=0, description="Relative chance of drawing a batch from this dataset.")
    max_num_samples: int | None = Field(None, gt=0, description="Use at most this many images (a fixed subset).")
    is_regularisation_data: bool = Field(
        False,
        validation_alias=AliasChoices("is_regularisation_data", "is_regularization_data"),
        description="Train towards the base model's own prediction (prior preservation).",
    )
    metadata_backend: Literal["discovery", "parquet"] = Field(
        "discovery", description="discovery: read sizes from the images; parquet: from the parquet columns."
    )
    parquet: ParquetSource | None = Field(None, description="Caption/size table for parquet datasets.")
    cache_dir_vae: str | None = Field(None, description="Folder of this dataset's cached latents.")
    cache_dir: str | None = Field(None, description="Folder of cached text embeddings (text_embeds datasets).")
    default: bool = Field(False, description="The text_embeds dataset used by default.")
    write_batch_size: int | None = Field(None, gt=0, description="Cache entries written per batch.")
    skip_file_discovery: str = Field(
        "", description="Words among vae, aspect, metadata, text: trust the caches instead of scanning."
    )
    hash_filenames: bool = Field(True, description="Name cache files by hash only (else mirror the image path).")
    train_batch_size: int | None = Field(None, gt=0, description="Batch size for this dataset's batches.")
    conditioning_data: list[str] | None = Field(
        None,
        description="id (or list of ids: a mask and a reference set) of the conditioning datasets paired with this one.",
    )
    conditioning_type: Literal["mask", "reference_strict", "reference_loose"] | None = Field(
        None,
        description="mask: a grayscale image per training image weighting the loss (white = train); "
        "reference_strict: the image an edit starts from, same file name and size (cropped like its target); "
        "reference_loose: the same, with its own size and bucket (FLUX Kontext).",
    )
    source_dataset_id: str | None = Field(None, description="For conditioning datasets: the image dataset.")

    @field_validator("crop_aspect_buckets", mode="before")
    @classmethod
    def _buckets(cls, value: Any) -> Any:
        value = json_list(value)
        if isinstance(value, list):
            # SimpleTuner also accepts {"aspect_bucket": 1.5, ...}; only the aspect matters here.
            return [v.get("aspect_bucket", v.get("aspect")) if isinstance(v, dict) else v for v in value]
        return value

    @field_validator("conditioning_data", mode="before")
    @classmethod
    def _conditioning_ids(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("id")
    @classmethod
    def _id_is_a_name(cls, value: str) -> str:
        # the id names the dataset's cache folder and index file: `../x` would write outside the cache
        from stune.names import name_problem

        problem = name_problem(value)
        if problem is not None:
            raise ValueError(f"the dataset id {problem}, and it names the dataset's cache folder; use a plain name")
        return value

    @model_validator(mode="after")
    def _rules(self) -> DatasetConfig:
        where = f"dataset `{self.id}`"
        from stune.names import text_problem

        for key in ("instance_data_dir", "cache_dir_vae", "cache_dir", "instance_prompt"):
            value = getattr(self, key)
            problem = text_problem(value, path_like=key != "instance_prompt") if value is not None else None
            if problem is not None:
                raise ValueError(f"{where}: `{key}` {problem}")
        problem = text_problem(self.parquet.path, path_like=True) if self.parquet is not None else None
        if problem is not None:
            raise ValueError(f"{where}: `parquet.path` {problem}")
        if self.dataset_type in ("image", "eval", "conditioning") and not self.disabled and not self.instance_data_dir:
            raise ValueError(f"`instance_data_dir` is missing: {where} needs the folder of its images")
        if (self.maximum_image_size is None) != (self.target_downsample_size is None):
            raise ValueError(f"{where}: set `maximum_image_size` and `target_downsample_size` together")
        if any(not isinstance(a, float) or a <= 0 for a in self.crop_aspect_buckets or []):
            raise ValueError(f"{where}: every `crop_aspect_buckets` entry is an aspect ratio (width/height) above 0")
        if self.crop and self.crop_aspect in ("closest", "random") and not self.crop_aspect_buckets:
            raise ValueError(f"{where}: crop_aspect={self.crop_aspect} needs `crop_aspect_buckets`")
        if (self.minimum_aspect_ratio and self.maximum_aspect_ratio) and (
            self.minimum_aspect_ratio > self.maximum_aspect_ratio
        ):
            raise ValueError(f"{where}: `minimum_aspect_ratio` is larger than maximum_aspect_ratio")
        if self.dataset_type == "conditioning" and self.conditioning_type is None:
            raise ValueError(
                f"{where} is a conditioning dataset; set `conditioning_type` (mask, reference_strict or reference_loose)"
            )
        words = self.skip_file_discovery.replace(",", " ").split()
        unknown = [w for w in words if w not in SKIP_DISCOVERY_WORDS]
        if unknown:
            raise ValueError(
                f"{where}: `skip_file_discovery` word {unknown[0]!r} is not one of {', '.join(SKIP_DISCOVERY_WORDS)}"
            )
        if (self.caption_strategy == "parquet" or self.metadata_backend == "parquet") and self.parquet is None:
            raise ValueError(f"{where}: parquet captions or metadata need a `parquet` block with its `path`")
        return self

    @property
    def skips(self) -> set[str]:
        return set(self.skip_file_discovery.replace(",", " ").split())


class ResolvedDataset:
    """A dataset entry with the global defaults filled in and its cache folders decided."""

    def __init__(self, entry: DatasetConfig, config: CoreOptions, text_cache_dir: Path) -> None:
        # SimpleTuner also takes these as global options: they are the defaults of every dataset.
        inherited = {
            key: getattr(config, key)
            for key in ("prepend_instance_prompt", "only_instance_prompt", "skip_file_discovery")
            if key not in entry.model_fields_set and getattr(config, key)
        }
        if inherited:
            try:
                entry = DatasetConfig.model_validate({**entry.model_dump(exclude_unset=True), **inherited})
            except ValidationError as exc:
                raise ConfigError(
                    f"Dataset `{entry.id}` with the global {', '.join(inherited)}: {_one_sentence(exc)}"
                ) from None
        self.id = entry.id
        self.entry = entry
        self.kind = entry.dataset_type
        self.folder = Path(entry.instance_data_dir or ".")
        self.resolution = float(entry.resolution or config.resolution)
        self.resolution_type = entry.resolution_type or config.resolution_type
        from stune.data.buckets import bucket_for_aspect

        try:
            square = bucket_for_aspect(1.0, self.resolution, self.resolution_type, 16)
        except (OverflowError, ValueError):
            square = (0, 0)
        if not 0 < square[0] * square[1] <= 2**32:  # 65536², far beyond any model's canvas
            raise ConfigError(
                f"Dataset `{self.id}`: resolution {self.resolution:g} ({self.resolution_type}) is no size an image "
                "can be trained at; use e.g. 1024 (pixel_area) or 1.0 (area)."
            )
        self.caption_strategy = entry.caption_strategy or config.caption_strategy
        self.instance_prompt = entry.instance_prompt or config.instance_prompt
        self.repeats = entry.repeats
        self.caption_seed = config.seed or 0  # caption_shuffle without a seed of its own
        self.batch_size = entry.train_batch_size or config.train_batch_size
        # Size limits: the dataset's own, else the global defaults (SimpleTuner's global options).
        explicit = entry.model_fields_set
        self.minimum_image_size = (
            entry.minimum_image_size if "minimum_image_size" in explicit else config.minimum_image_size
        )
        if "maximum_image_size" in explicit:
            self.maximum_image_size, self.target_downsample_size = (
                entry.maximum_image_size,
                entry.target_downsample_size,
            )
        else:
            self.maximum_image_size, self.target_downsample_size = (
                config.maximum_image_size,
                config.target_downsample_size,
            )
        if (self.maximum_image_size is None) != (self.target_downsample_size is None):
            raise ConfigError(f"Dataset `{self.id}`: set `maximum_image_size` and `target_downsample_size` together.")
        self.max_upscale_threshold = (
            entry.max_upscale_threshold if "max_upscale_threshold" in explicit else config.max_upscale_threshold
        )
        self.is_regularisation = entry.is_regularisation_data
        self.ignore_missing_files = config.ignore_missing_files
        if entry.parquet is not None:  # the global parquet_* options fill the columns the block leaves out
            given = entry.parquet.model_fields_set
            defaults = {
                "caption_column": config.parquet_caption_column,
                "filename_column": config.parquet_filename_column,
            }
            update = {k: v for k, v in defaults.items() if v is not None and k not in given}
            if update:
                entry.parquet = entry.parquet.model_copy(update=update)
        root = Path(config.cache_dir_vae) if config.cache_dir_vae else Path(config.cache_dir) / "vae"
        self.latent_cache_dir = Path(entry.cache_dir_vae) if entry.cache_dir_vae else root / entry.id
        self.text_cache_dir = text_cache_dir
        self.masks: ResolvedDataset | None = None  # the linked mask dataset (masked loss)
        self.references: ResolvedDataset | None = None  # the linked reference images (edit pairs)
        needs_prompt = self.caption_strategy == "instanceprompt" or entry.prepend_instance_prompt
        if (needs_prompt or entry.only_instance_prompt) and not self.instance_prompt:
            raise ConfigError(f"Dataset `{self.id}` uses its instance prompt; set `instance_prompt` on it.")


def read_dataset_list(config: CoreOptions) -> tuple[Path, list[DatasetConfig]]:
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
        raw = {str(k).lstrip("-"): v for k, v in raw.items()}
        name = str(raw.get("id", f"#{index}"))[:60]  # a hostile id must not make the message a megabyte
        translate_dataset_keys(raw, known, f"Dataset `{name}` in {path}")
        for key in raw:
            if key not in known:
                close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
                hint = f"; did you mean `{close[0]}`?" if close else "; see docs/datasets.md for the keys."
                raise ConfigError(f"Dataset `{name}` in {path} has an unknown key `{key}`{hint}")
        try:
            entries.append(DatasetConfig.model_validate(raw))
        except ValidationError as exc:
            raise ConfigError(f"Dataset `{name}` in {path}: {_one_sentence(exc)}") from None
    ids = [e.id for e in entries]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ConfigError(f"Dataset id `{duplicates[0]}` appears twice in {path}; ids must be unique.")
    return path, entries


class DatasetList:
    """The datasets of a run and where their caption embeddings are cached."""

    def __init__(self, datasets: list[ResolvedDataset], text_cache_dir: Path, text_write_batch_size: int) -> None:
        self.datasets = datasets
        self.text_cache_dir = text_cache_dir
        self.text_write_batch_size = text_write_batch_size

    @property
    def training(self) -> list[ResolvedDataset]:
        return [ds for ds in self.datasets if ds.kind == "image"]


def resolve_datasets(config: CoreOptions) -> DatasetList:
    """The enabled image, eval and conditioning datasets; errors name the dataset and the fix."""
    path, all_entries = read_dataset_list(config)
    entries = [e for e in all_entries if not e.disabled]
    text_sets = [e for e in entries if e.dataset_type == "text_embeds"]
    if len([e for e in text_sets if e.default]) > 1:
        raise ConfigError(f"More than one text_embeds dataset in {path} has default=true; mark only one.")
    default_text = next((e for e in text_sets if e.default), text_sets[0] if text_sets else None)
    if default_text is not None and default_text.cache_dir:
        text_dir = Path(default_text.cache_dir)
    elif config.cache_dir_text:
        text_dir = Path(config.cache_dir_text)
    else:
        text_dir = Path(config.cache_dir) / "text"
    text_batch = (default_text.write_batch_size if default_text else None) or config.write_batch_size
    datasets = [ResolvedDataset(e, config, text_dir) for e in entries if e.dataset_type != "text_embeds"]
    if not any(ds.kind == "image" for ds in datasets):
        raise ConfigError(f"The dataset list {path} has no enabled image dataset; add one with instance_data_dir.")
    by_id = {ds.id: ds for ds in datasets}
    for ds in datasets:  # a conditioning dataset may name its image dataset instead (source_dataset_id)
        source = by_id.get(ds.entry.source_dataset_id or "") if ds.kind == "conditioning" else None
        if (
            ds.kind == "conditioning"
            and ds.entry.source_dataset_id
            and (source is None or source.kind == "conditioning")
        ):
            raise ConfigError(
                f"Conditioning dataset `{ds.id}` names source_dataset_id `{ds.entry.source_dataset_id}`, which is not "
                f"an enabled image or eval dataset in {path}; fix the id."
            )
        if source is not None and ds.id not in (source.entry.conditioning_data or []):
            source.entry.conditioning_data = [*(source.entry.conditioning_data or []), ds.id]
    for ds in datasets:
        if not ds.folder.is_dir():
            raise ConfigError(f"Dataset `{ds.id}`: the folder {ds.folder} does not exist; fix instance_data_dir.")
        for link in ds.entry.conditioning_data or []:
            target = by_id.get(link)
            if target is None or target.kind != "conditioning":
                raise ConfigError(
                    f"Dataset `{ds.id}` names conditioning_data `{link}`, which is not an enabled conditioning dataset "
                    f"in {path}; add it with dataset_type=conditioning and a conditioning_type."
                )
            role = "masks" if target.entry.conditioning_type == "mask" else "references"
            if getattr(ds, role) is not None:
                raise ConfigError(
                    f"Dataset `{ds.id}` links two {role[:-1]} datasets (`{getattr(ds, role).id}` and `{link}`); "
                    "keep one of each kind in conditioning_data."
                )
            setattr(ds, role, target)
    return DatasetList(datasets, text_dir, text_batch)
