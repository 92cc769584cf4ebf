"""Datasets and caches (the per-dataset keys are in stune.data.config)."""

from __future__ import annotations

from typing import Literal

from stune.options import Field, Options


class DataOptions(Options):
    data_backend_config: str | None = Field(
        None, description="Dataset list (multidatabackend.json); default config/multidatabackend.json."
    )
    resolution: float = Field(1024, gt=0, description="Training resolution (unit set by resolution_type).")
    resolution_type: Literal["pixel", "area", "pixel_area"] = Field(
        "pixel_area", description="pixel: shorter edge; area: megapixels; pixel_area: side of a square of equal area."
    )
    caption_strategy: Literal["filename", "textfile", "instanceprompt", "parquet"] = Field(
        "filename", description="Where captions come from (datasets may override)."
    )
    instance_prompt: str | None = Field(None, description="Caption for caption_strategy=instanceprompt.")
    prepend_instance_prompt: bool = Field(
        False, description="Default prepend_instance_prompt of the datasets: instance_prompt before every caption."
    )
    only_instance_prompt: bool = Field(
        False, description="Default only_instance_prompt of the datasets: instance_prompt as the only caption."
    )
    skip_file_discovery: str = Field(
        "", description="Default skip_file_discovery of the datasets (words among vae, aspect, metadata, text)."
    )
    cache_dir: str = Field("cache", description="Root folder of the latent and text-embedding caches.")
    cache_dir_vae: str | None = Field(
        None,
        description="Root of the VAE latent caches: each dataset's goes to <cache_dir_vae>/<dataset id> (a "
        "dataset's own cache_dir_vae is used as it is); default <cache_dir>/vae.",
    )
    cache_dir_text: str | None = Field(None, description="Text-embedding cache folder; default <cache_dir>/text.")
    minimum_image_size: float | None = Field(
        None, ge=0, description="Default minimum_image_size of the datasets (unit of resolution_type)."
    )
    maximum_image_size: float | None = Field(None, gt=0, description="Default maximum_image_size of the datasets.")
    target_downsample_size: float | None = Field(
        None, gt=0, description="Default target_downsample_size of the datasets."
    )
    max_upscale_threshold: float | None = Field(
        None, ge=0, description="Default max_upscale_threshold of the datasets (skip images upscaled beyond it)."
    )
    disable_bucket_pruning: bool = Field(
        False,
        description="Keep size buckets with fewer samples than a batch (and each bucket's last partial batch): the "
        "batch is completed by repeating the bucket's own samples. Default: those samples sit out the epoch.",
    )
    ignore_missing_files: bool = Field(
        False,
        description="An image listed in a trusted index (skip_file_discovery) that no longer exists is skipped and "
        "counted in the dataset report instead of stopping the run.",
    )
    parquet_caption_column: str | None = Field(
        None, description="Default caption_column of the datasets' parquet blocks (else `caption`)."
    )
    parquet_filename_column: str | None = Field(
        None, description="Default filename_column of the datasets' parquet blocks (else `id`)."
    )
    vae_batch_size: int = Field(4, gt=0, description="Images per VAE forward while caching.")
    text_encoder_batch_size: int = Field(8, gt=0, description="Captions per text-encoder forward while caching.")
    write_batch_size: int = Field(128, gt=0, description="Cache entries handed to the background writer at once.")
    aspect_bucket_rounding: int = Field(
        2, ge=0, le=6, description="Decimals an image's aspect ratio is rounded to when choosing its bucket."
    )
    offload_during_startup: bool = Field(
        False, description="Keep only the encoder in use on the accelerator while caching (saves memory)."
    )
    masked_loss_probability: float = Field(
        1.0, ge=0, le=1, description="Chance that a sample with a mask has its loss weighted by it (else unmasked)."
    )
    caption_dropout_probability: float = Field(
        0.1, ge=0, le=1, description="Probability of training a sample on the empty caption."
    )
    tokenizer_max_length: int | None = Field(
        None, gt=0, description="Token length of the long text encoder (T5); family default when unset."
    )
