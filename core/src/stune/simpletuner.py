"""SimpleTuner compatibility: what stune does with each SimpleTuner option and dataset key.

Users arrive with SimpleTuner configs, so "unknown key" is the wrong answer to a real SimpleTuner
option. Every name of SimpleTuner 4.10.1's ``train`` parser that concerns image flow-matching
transformers, and every key of its ``multidatabackend.json``, has one status here:

* **implemented**: stune has an option (or dataset key) of that name that acts; the row names
  the test that shows it (:data:`OPTION_TESTS`, :data:`DATASET_KEY_TESTS`);
* **plugin**: a first-party plugin owns it (``catalog.json``): installed, it is implemented;
  missing, the configuration check names the package to install;
* **differently**: accepted; stune reaches the same end another way, and the row says how. A
  row may map the value onto a stune option (``ema_cpu_only`` → ``ema_device``), or accept only
  the values that describe what stune does anyway (``gradient_checkpointing_backend=torch``);
* **refused**: the configuration check stops with one sentence naming the option, why, and what
  to do instead, unless the value is SimpleTuner's default or otherwise asks for nothing
  (``delete_problematic_images: false``), which is accepted with an info line so real
  SimpleTuner configs run.

:func:`translate_options` and :func:`translate_dataset_keys` apply the table while a
configuration is read; :func:`compat_markdown` writes docs/simpletuner-compat.md. Torch-free.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stune.errors import ConfigError

if TYPE_CHECKING:
    from stune.plugins import PluginHost

log = logging.getLogger("stune.config")

IMPLEMENTED = "implemented"
PLUGIN = "plugin"
DIFFERENTLY = "differently"
REFUSED = "refused"


@dataclass(frozen=True)
class Row:
    """What stune does with one SimpleTuner name that is not a stune option of the same name."""

    status: str  # DIFFERENTLY or REFUSED
    reason: str  # differently: how stune differs; refused: why, and what to do instead
    #: refused: values that ask nothing of the option; differently with ``only``: the values accepted
    neutral: tuple[Any, ...] = ()
    #: differently: turns the value into stune options (an empty dict when it asks for nothing)
    maps: Callable[[Any], dict[str, Any]] | None = None
    #: the stune option or mechanism that does the job (shown in the docs)
    stune: str = ""
    #: differently: whether only ``neutral`` values are accepted (the others are refused with ``refusal``)
    only: bool = False
    refusal: str = ""


def differently(
    reason: str,
    *,
    stune: str = "",
    maps: Callable[[Any], dict[str, Any]] | None = None,
    only: tuple[Any, ...] | None = None,
    refusal: str = "",
) -> Row:
    return Row(DIFFERENTLY, reason, tuple(only or ()), maps, stune, only is not None, refusal)


def refused(reason: str, *neutral: Any, stune: str = "") -> Row:
    return Row(REFUSED, reason, neutral, None, stune)


def _to(option: str, *, when: Any = True, value: Any = None) -> Callable[[Any], dict[str, Any]]:
    """A map that sets ``option`` (to ``value``, or the given value) when the input equals ``when``."""

    def apply(given: Any) -> dict[str, Any]:
        if when is not None and not same_value(given, when):
            return {}
        return {option: given if value is None else value}

    return apply


def _none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null"))


def same_value(a: Any, b: Any) -> bool:
    """SimpleTuner values compared as SimpleTuner reads them: ``"false"`` is False, ``"0.5"`` is 0.5."""
    if _none(a) or _none(b):
        return _none(a) and _none(b)
    for kind in (_as_bool, _as_float):
        x, y = kind(a), kind(b)
        if x is not None and y is not None:
            return x == y
    return str(a).strip().lower() == str(b).strip().lower()


def _as_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return None


def _as_float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# -- options ----------------------------------------------------------------------------------------------

_IGNORED_AS_IN_SIMPLETUNER = (
    "flow-matching transformers draw σ with the flow_* options, so SimpleTuner ignores it for them too"
)

#: SimpleTuner options that are not stune options of the same name (stune's own and the plugins'
#: options are looked up in the option registry, not here).
OPTION_ROWS: dict[str, Row] = {
    # -- accepted: stune does the job its own way ------------------------------------------------------
    "accelerator_cache_clear_interval": differently(
        "stune empties the accelerator's memory cache once, between caching and training, and never during "
        "training steps; the interval is ignored."
    ),
    "allow_dataset_oversubscription": differently(
        "stune never raises `repeats` by itself: a dataset too small for one batch stops the check with a "
        "sentence asking to raise its `repeats` or lower train_batch_size.",
        stune="repeats (dataset key)",
    ),
    "aspect_bucket_alignment": differently(
        "bucket sides are multiples of the family's own alignment (64 px for the flow-matching "
        "transformers, which SimpleTuner forces for them as well); the value is ignored."
    ),
    "aspect_bucket_disable_rebuild": differently(
        "stune keeps each image's size in a per-dataset index and recomputes the buckets from it at every start "
        "without reopening images, so there is no bucket file to keep from rebuilding."
    ),
    "aspect_bucket_worker_count": differently(
        "stune sizes the dataset scan's worker pool itself; the count is ignored."
    ),
    "checkpointing_use_tempdir": differently(
        "stune always writes a checkpoint into a hidden temporary folder and renames it to checkpoint-<step> "
        "once complete, so a killed run never leaves a half-written checkpoint."
    ),
    "compress_disk_cache": differently(
        "stune's latent and text caches are uncompressed safetensors files, read without a decompression step; "
        "the value is ignored."
    ),
    "data_aesthetic_score": differently(
        "it is an SDXL micro-conditioning input that flow-matching transformers do not take; SimpleTuner ignores it "
        "for them and so does stune."
    ),
    "data_backend_sampling": differently(
        "stune draws each batch's dataset with weight `probability` × batches it has left in the epoch, which "
        "covers every batch once per epoch; `uniform` and `auto-weighting` are not told apart.",
        stune="probability (dataset key)",
    ),
    "dataloader_prefetch": differently(
        "stune always loads the next batches from the caches on a background thread while the step runs."
    ),
    "dataloader_prefetch_qlen": differently(
        "stune's background loader keeps a fixed two batches ahead; the queue length is ignored."
    ),
    "dataloader_prefetch_device_threshold_mb": differently(
        "stune's background loader keeps prefetched batches in CPU memory until their step moves them; the "
        "threshold is ignored."
    ),
    "debug_aspect_buckets": differently(
        "`st-train check` prints every dataset's buckets (and all of it with --json); training adds no bucket "
        "debug output.",
        stune="st-train check",
    ),
    "debug_dataset_loader": differently(
        "`st-train check` lists every skipped image with its reason and the run writes the same dataset report; "
        "the loader has no extra debug output.",
        stune="st-train check",
    ),
    "delete_invalid_checkpoints": differently(
        "a stune checkpoint only gets its checkpoint-<step> name once complete (written to a temporary folder, "
        "then renamed), so resume never meets an invalid one to delete; a leftover temporary folder is ignored "
        "and replaced.",
        stune="resume_from_checkpoint",
    ),
    "disable_segmented_timestep_sampling": differently(
        f"segmented timestep sampling is for ε/v-prediction models; {_IGNORED_AS_IN_SIMPLETUNER}."
    ),
    "ema_cpu_only": differently(
        "`ema_cpu_only: true` becomes stune's `ema_device: cpu` (the EMA copy lives on the CPU).",
        stune="ema_device",
        maps=_to("ema_device", value="cpu"),
    ),
    "ema_foreach_disable": differently(
        "stune's EMA already updates tensor by tensor without foreach kernels; the value is ignored."
    ),
    "enable_multiprocessing": differently(
        "stune picks threads or processes for the dataset scan and cache writes itself; the value is ignored."
    ),
    "quantize_activations": differently(
        "the quantized base keeps its activations in the training dtype; false (SimpleTuner's default) is accepted",
        only=(False, None),
        refusal="optimum-quanto has no gradient through quantized activations (its dequantize has no derivative), "
        "so a LoRA on the base would not learn; set it to false",
    ),
    "validation_guidance_rescale": differently(
        "validation images are rendered by diffusers' flow-matching transformer pipelines, which have no CFG "
        "rescale; 0 (off, SimpleTuner's default and the seeds' value) is accepted",
        only=(0, None),
        refusal="the flow-matching pipelines stune validates with have no CFG rescale (guidance_rescale); remove the "
        "key or set it to 0",
    ),
    "flow_timesteps_mode": differently(
        "stune draws each sample's σ from flow_custom_timesteps at random, SimpleTuner's `fixed-list` mode.",
        stune="flow_custom_timesteps",
        only=("fixed-list", None),
        refusal="stune draws σ from the list at random (fixed-list), from the run's seeded generator so that resume "
        "is exact; round-robin order is not offered, remove the key",
    ),
    "gradient_checkpointing_segment_stride": differently(
        "the stride n becomes stune's gradient_checkpointing_interval n (unless that is set): every n-th block is "
        "checkpointed and the blocks between keep their activations, so memory use lies between checkpointing every "
        "block and none; stune does not group blocks into multi-block checkpoint segments.",
        stune="gradient_checkpointing_interval",
        maps=_to("gradient_checkpointing_interval", when=None),
    ),
    "gradient_checkpointing_backend": differently(
        "stune checkpoints whole transformer blocks with torch.utils.checkpoint, which is SimpleTuner's `torch` "
        "backend.",
        stune="gradient_checkpointing",
        only=("torch",),
        refusal="the unsloth/ffn backends offload every block's saved activations to the CPU, and stune offloads only "
        "attention's (gradient_checkpointing_offload_attention); use that, `musubi_blocks_to_swap` or "
        "`enable_group_offload` to save accelerator memory instead",
    ),
    "gradient_precision": differently(
        "stune keeps the trained weights, and so their gradients, in fp32 whatever the base precision, except "
        "with optimizer adamw_bf16, which is built for bf16 weights and gradients; `fp32` therefore holds for "
        "every other optimizer.",
        only=("unmodified", "fp32", None),
        refusal="stune keeps trained weights and gradients in fp32 (bf16 only with adamw_bf16); remove the key",
    ),
    "image_processing_batch_size": differently(
        "stune's cache filler reads and resizes images in its own batches (see vae_batch_size); the value is ignored.",
        stune="vae_batch_size",
    ),
    "inference_scheduler_timestep_spacing": differently(
        "timestep spacing applies to DDPM-style inference schedulers; the families' flow-matching samplers "
        "space σ themselves, and SimpleTuner ignores it for them as well."
    ),
    "training_scheduler_timestep_spacing": differently(
        f"timestep spacing applies to DDPM-style training schedulers; {_IGNORED_AS_IN_SIMPLETUNER}."
    ),
    "local_rank": differently(
        "stune takes each process's rank from the LOCAL_RANK/RANK variables that torchrun or accelerate set; "
        "the value is ignored.",
        stune="num_processes",
    ),
    "max_workers": differently(
        "stune sizes the thread pool that reads images for caching itself; the value is ignored."
    ),
    "metadata_update_interval": differently(
        "stune scans every dataset at each start and not again during training, so there is nothing to refresh "
        "periodically."
    ),
    "override_dataset_config": differently(
        "stune re-reads the dataset list and rescans at every start (resume included), so changed dataset "
        "settings always apply; the value is ignored."
    ),
    "peft_lora_mode": differently(
        "stune's PEFT LoRA is the standard one.",
        only=("standard",),
        refusal="SingLoRA is not available in stune; use the standard LoRA (lora_type=standard) or a LyCORIS "
        "algorithm (lora_type=lycoris)",
    ),
    "preserve_data_backend_cache": differently(
        "stune keeps its per-dataset size index between runs and only opens new or changed images, so large "
        "datasets are not rescanned; the value is ignored."
    ),
    "print_filenames": differently(
        "`st-train check` and the run's dataset report name every skipped image and why; no file names are "
        "printed during training.",
        stune="st-train check",
    ),
    "print_sampler_statistics": differently(
        "the run's dataset report (and `st-train check`) gives each dataset's image, bucket and batch counts; the "
        "sampler prints nothing more.",
        stune="st-train check",
    ),
    "read_batch_size": differently(
        "stune's cache filler reads images ahead in its own batches; the value is ignored.",
        stune="vae_batch_size",
    ),
    "same_network": differently(
        "multi-machine networking is accelerate's business: put it in the accelerate_config file; the value is "
        "ignored.",
        stune="accelerate_config",
    ),
    "seed_for_each_device": differently(
        "stune always derives each process's noise and feature generators from `seed` and the process rank, "
        "SimpleTuner's default (true).",
        only=(True,),
        refusal="stune always seeds each process differently (from seed and rank); remove the key",
    ),
    "text_cache_disable": differently(
        "stune encodes every caption before training and keeps the text cache on disk (it is what lets the text "
        "encoders leave memory during training); the value is ignored."
    ),
    "text_cache_ondemand": differently(
        "stune encodes every caption before training, reusing what the text cache already holds; captions are "
        "never encoded during training steps."
    ),
    "tracker_image_layout": differently(
        "stune logs each validation image under its prompt's name, one image per prompt; the layout is fixed."
    ),
    "vae_cache_disable": differently(
        "stune always writes the latent cache (it makes resume exact and the next run fast); delete cache_dir_vae "
        "after training if the disk space matters."
    ),
    "vae_cache_ondemand": differently(
        "stune encodes every latent before training in one pass on the accelerator and reuses the cache in "
        "later runs; training steps read cached latents only.",
        stune="cache_dir_vae",
    ),
    "vae_cache_scan_behaviour": differently(
        "stune names each cached latent by a fingerprint of its image file and size plan and checks it at start, "
        "so a changed image or setting is re-encoded without a scan mode."
    ),
    "validation_multigpu": differently(
        "stune renders validation images on the main process while the others wait (all processes together when "
        "FSDP shards the model); the value is ignored."
    ),
    "validation_lycoris_strength": differently(
        "stune validates a LyCORIS adapter at the multiplier it trains with (1.0).",
        only=(1.0,),
        refusal="stune validates LyCORIS adapters at multiplier 1.0 only; remove the key and scale the adapter "
        "when you load it",
    ),
    "validation_seed_source": differently(
        "stune draws validation noise from a CPU generator seeded with validation_seed, so images match across "
        "machines (SimpleTuner's `cpu`).",
        stune="validation_seed",
        only=("cpu",),
        refusal="stune draws validation noise on the CPU only, so images are the same on every machine; remove the key",
    ),
    "validation_disable_unconditional": differently(
        "stune renders only the configured prompts, never an extra caption-less image, which is what `true` asks.",
        stune="validation_prompt",
    ),
    "validation_randomize": differently(
        "stune seeds each validation prompt with validation_seed so images are comparable step after step.",
        stune="validation_seed",
        only=(False,),
        refusal="stune uses fixed validation seeds so that images are comparable across steps; set "
        "`validation_seed` to change them",
    ),
    # -- refused: stune has no such method (the listed values ask nothing and pass) ----------------------
    "conditioning_multidataset_sampling": refused(
        "stune links at most one mask and one reference dataset to each image dataset, so there is no choice "
        "between several conditioning sets to make; keep one of each kind in conditioning_data",
        "random",
        None,
    ),
    "custom_text_encoder_intermediary_layers": refused(
        "stune takes the text-encoder layers each family's pipeline uses, so the adapter matches the pipeline at "
        "inference; remove the key",
        None,
    ),
    "custom_tracker": refused(
        "stune's trackers are the report_to values; to send metrics elsewhere write a plugin with the "
        "on_step_end and on_validation_done hooks (docs/plugins.md)",
        None,
    ),
    "delete_model_after_load": refused(
        "stune never deletes model files from the Hugging Face cache; remove them with `hf cache delete` once "
        "training is over",
        False,
    ),
    "delete_problematic_images": refused(
        "stune never modifies dataset folders: unreadable images are skipped and listed in the dataset report; "
        "remove the key",
        False,
    ),
    "delete_unwanted_images": refused(
        "stune never deletes files from a dataset: images outside the size or aspect limits are skipped and "
        "listed by `st-train check`; remove the key",
        False,
    ),
    "diffusion_blocks_config": refused(
        "stune's block-level memory options work on the family's declared blocks (musubi_blocks_to_swap, "
        "enable_group_offload); use those instead",
        None,
    ),
    "dynamo_cache_export": refused(
        "stune does not export torch.compile caches; compiled graphs are rebuilt each run (torch reuses its own "
        "on-disk cache)",
        False,
        None,
    ),
    "dynamo_cache_export_after_first_step": refused(
        "with no compile-cache export in stune there is nothing to write after the first step; remove the key",
        False,
    ),
    "dynamo_hub_repo_id": refused(
        "stune never uploads torch.compile caches to the Hugging Face Hub; remove the key",
        None,
    ),
    "dynamo_wrapper": refused(
        "stune calls torch.compile directly, set by dynamo_backend and dynamo_mode; remove the key",
        None,
        "none",
    ),
    "find_unused_parameters": refused(
        "stune's adapter parameters all take part in every step, so DDP's unused-parameter search is not offered; "
        "remove the key",
        False,
    ),
    "gradient_checkpointing_offload_pin_memory_max_buckets": refused(
        "stune's attention offload (gradient_checkpointing_offload_attention) pins each offloaded tensor as torch's "
        "save_on_cpu does, with no bounded pool of pinned buffers to size; remove the key",
        12,
        None,
    ),
    "gradient_checkpointing_offload_prefetch": refused(
        "stune's attention offload brings each tensor back when backward reaches it, without prefetching ahead; "
        "remove the key",
        False,
    ),
    "layer_freeze_strategy": refused(
        "stune has no BitFit layer freezing; train a LoRA or LyCORIS adapter (model_type=lora) instead",
        None,
        "none",
    ),
    "model_card_base_model": refused(
        "stune's model card names pretrained_model_name_or_path as the base model; edit the card's base_model "
        "field before publishing if it must differ",
        None,
    ),
    "offload_param_path": refused(
        "it is DeepSpeed's NVMe offload folder; set `zero_optimization.offload_param.nvme_path` in the "
        "deepspeed_config file instead",
        None,
    ),
    "pretrained_t5_model_name_or_path": refused(
        "stune loads the T5 encoder from the model folder; point pretrained_model_name_or_path at a folder that "
        "holds it",
        None,
    ),
    "save_text_encoder": refused(
        "stune never trains the text encoders, so it has none to save; the base model's are used at inference",
        False,
    ),
    "strict_epoch_limit": refused(
        "stune stops exactly at max_train_steps or at the end of num_train_epochs already; remove the key",
        False,
    ),
    "text_embed_full_cache": refused(
        "stune caches exactly the text-encoder outputs each family's transformer takes, in one layout; remove the key",
        False,
    ),
    "text_encoder_limit": refused(
        "stune loads every text encoder of the family (it caches captions with all of them, then frees them); "
        "remove the key",
        None,
    ),
    "trust_remote_code": refused(
        "stune loads only diffusers and transformers classes and never runs code from a model repository; "
        "remove the key",
        False,
    ),
    "vae_enable_patch_conv": refused(
        "stune does not use diffusers' patch-convolution VAE path; set vae_enable_tiling or vae_enable_slicing "
        "to save VAE memory",
        False,
    ),
    "validation_using_datasets": refused(
        "stune validates from validation_prompt / user_prompt_library (and, for edit models, the eval dataset's "
        "reference images); remove the key",
        False,
        None,
    ),
    "variant": refused(
        "stune loads each component's default weight files; point pretrained_model_name_or_path at a folder "
        "whose files are the precision you want",
        None,
    ),
}

# -- dataset keys ---------------------------------------------------------------------------------------

#: Keys of SimpleTuner's multidatabackend.json entries (its DATALOADER documentation and
#: reference §1.5/§2.6), minus those of video/audio/ControlNet-only datasets' inner blocks.
SIMPLETUNER_DATASET_KEYS: tuple[str, ...] = (
    "id",
    "type",
    "dataset_type",
    "disabled",
    "disable",
    "instance_data_dir",
    "resolution",
    "resolution_type",
    "minimum_image_size",
    "maximum_image_size",
    "target_downsample_size",
    "minimum_aspect_ratio",
    "maximum_aspect_ratio",
    "max_upscale_threshold",
    "crop",
    "crop_aspect",
    "crop_aspect_buckets",
    "crop_style",
    "caption_strategy",
    "instance_prompt",
    "prepend_instance_prompt",
    "only_instance_prompt",
    "caption_shuffle",
    "caption_filter_list",
    "disable_multiline_split",
    "repeats",
    "max_num_samples",
    "probability",
    "start_epoch",
    "start_step",
    "end_epoch",
    "end_step",
    "is_regularisation_data",
    "is_regularization_data",
    "metadata_backend",
    "parquet",
    "cache_dir_vae",
    "cache_dir",
    "default",
    "image_embeds",
    "text_embeds",
    "conditioning_image_embeds",
    "cache_dir_conditioning_image_embeds",
    "write_batch_size",
    "text_encoder_batch_size",
    "text_cache_ondemand",
    "text_cache_disable",
    "vae_cache_ondemand",
    "vae_cache_disable",
    "vae_cache_clear_each_epoch",
    "clear_cache_each_epoch",
    "hash_filenames",
    "skip_file_discovery",
    "preserve_data_backend_cache",
    "metadata_update_interval",
    "scan_for_errors",
    "disable_validation",
    "delete_unwanted_images",
    "delete_problematic_images",
    "delete_nsfw_images",
    "conditioning_type",
    "conditioning_data",
    "source_dataset_id",
    "conditioning",
    "timestep_sampling_offset",
    "train_batch_size",
    "slider_strength",
    "aws_bucket_name",
    "aws_region_name",
    "aws_endpoint_url",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_data_prefix",
    "aws_max_pool_connections",
    "csv_file",
    "csv_cache_dir",
    "csv_caption_column",
    "csv_url_column",
    "dataset_name",
    "huggingface",
    "split",
    "revision",
    "image_column",
    "caption_column",
    "streaming",
    "video",
    "audio",
    "memory_filesystem_path",
    "memory_filesystem_size",
    "memory_filesystem_sudo",
)

_LOCAL_ONLY = "stune reads datasets from local folders only"

DATASET_ROWS: dict[str, Row] = {
    "vae_cache_ondemand": OPTION_ROWS["vae_cache_ondemand"],
    "vae_cache_disable": OPTION_ROWS["vae_cache_disable"],
    "text_cache_ondemand": OPTION_ROWS["text_cache_ondemand"],
    "text_cache_disable": OPTION_ROWS["text_cache_disable"],
    "preserve_data_backend_cache": OPTION_ROWS["preserve_data_backend_cache"],
    "metadata_update_interval": OPTION_ROWS["metadata_update_interval"],
    "vae_cache_clear_each_epoch": differently(
        "stune draws a random crop once per image (not per epoch), so its cached latents stay valid and nothing "
        "is cleared or re-encoded between epochs."
    ),
    "clear_cache_each_epoch": differently(
        "stune's crops are fixed per image, so the latent cache stays valid across epochs and is never cleared."
    ),
    "scan_for_errors": differently(
        "`st-train check` decodes every image and lists the broken ones; training skips unreadable images and "
        "names them in the dataset report.",
        stune="st-train check",
    ),
    "disable_validation": differently(
        "stune never takes validation images from a training dataset (it renders the validation prompts), so "
        "there is nothing to disable."
    ),
    "text_embeds": differently(
        "stune keeps every caption embedding in one text cache, the default text_embeds dataset's cache_dir; an "
        "image dataset does not pick another one.",
        stune="cache_dir (text_embeds dataset)",
    ),
    "image_embeds": differently(
        "stune writes an image dataset's latents to its own cache_dir_vae rather than to a separate "
        "image_embeds dataset.",
        stune="cache_dir_vae",
    ),
    "text_encoder_batch_size": differently(
        "stune encodes captions text_encoder_batch_size at a time for every text cache (the global option); the "
        "per-dataset value is ignored.",
        stune="text_encoder_batch_size",
    ),
    "start_epoch": refused(
        "stune plans every epoch from all enabled training datasets (which keeps resume exact); train the "
        "datasets in separate runs chained with init_lora for a curriculum",
        1,
        None,
    ),
    "start_step": refused(
        "stune's epoch plan includes a dataset from the first step; for a dataset that joins later, start a "
        "second run with it and init_lora pointing at the first run's adapter",
        0,
        None,
    ),
    "end_epoch": refused(
        "stune keeps every enabled dataset in every epoch; to stop training on one after N epochs, run N epochs, "
        "then continue without it using init_lora",
        None,
    ),
    "end_step": refused(
        "stune trains every enabled dataset until the run ends; to drop one after N steps, stop at N steps and "
        "continue without it using init_lora",
        None,
    ),
    "delete_unwanted_images": OPTION_ROWS["delete_unwanted_images"],
    "delete_problematic_images": OPTION_ROWS["delete_problematic_images"],
    "delete_nsfw_images": refused(
        "stune runs no NSFW classifier and never deletes dataset files; remove the key and curate the folder yourself",
        False,
    ),
    "conditioning": refused(
        "stune does not generate conditioning images (super-resolution, depth, canny, masks…); make them "
        "yourself and add them as a conditioning dataset",
        None,
    ),
    "conditioning_image_embeds": refused(
        "stune's families take no image-encoder conditioning, so stune has no such cache; remove the key",
        None,
    ),
    "cache_dir_conditioning_image_embeds": refused(
        "stune has no conditioning image-embed cache for its families, so it needs no folder for one; remove the key",
        None,
    ),
    "timestep_sampling_offset": refused(
        "stune samples σ the same way for every dataset (the flow_* options); remove the key or set the run's "
        "flow_sigmoid_scale / flow_schedule_shift",
        0,
        0.0,
        None,
    ),
    "slider_strength": refused(
        "stune has no slider LoRA training; remove the key",
        None,
    ),
    "aws_bucket_name": refused(f"{_LOCAL_ONLY}; sync the bucket to a folder first (`aws s3 sync`)", None),
    "aws_region_name": refused(f"{_LOCAL_ONLY}, so an S3 region means nothing here; sync the bucket locally", None),
    "aws_endpoint_url": refused(f"{_LOCAL_ONLY}; download from the S3-compatible endpoint with its own tool", None),
    "aws_access_key_id": refused(
        f"{_LOCAL_ONLY} and never takes cloud credentials in a config; sync the bucket with the AWS CLI", None
    ),
    "aws_secret_access_key": refused(
        f"{_LOCAL_ONLY}; keep secrets out of the dataset list and sync the bucket with the AWS CLI", None
    ),
    "aws_data_prefix": refused(f"{_LOCAL_ONLY}; sync that prefix of the bucket into instance_data_dir", None, ""),
    "aws_max_pool_connections": refused(f"{_LOCAL_ONLY}, so there is no S3 connection pool to size", None),
    "csv_file": refused(f"{_LOCAL_ONLY}; download the URLs of the CSV into a folder with .txt captions", None),
    "csv_cache_dir": refused(f"{_LOCAL_ONLY}; download the CSV's images yourself into instance_data_dir", None),
    "csv_caption_column": refused(
        f"{_LOCAL_ONLY}; write each CSV caption next to its downloaded image as a .txt file (caption_strategy "
        "textfile)",
        None,
    ),
    "csv_url_column": refused(f"{_LOCAL_ONLY}; fetch the URLs of that column into a folder first", None),
    "dataset_name": refused(
        f"{_LOCAL_ONLY}; save the Hugging Face dataset's images and captions to a folder (datasets' "
        "`save_to_disk` or an export script)",
        None,
    ),
    "huggingface": refused(f"{_LOCAL_ONLY}; export the Hub dataset to a folder of images and .txt captions", None),
    "split": refused(f"{_LOCAL_ONLY}; export the split you want to a folder", None),
    "revision": refused(f"{_LOCAL_ONLY}; export that revision of the Hub dataset to a folder", None),
    "image_column": refused(f"{_LOCAL_ONLY}; export that image column to files in a folder", None),
    "caption_column": refused(
        f"{_LOCAL_ONLY}; export the captions to .txt files, or use a parquet block with caption_column", None
    ),
    "streaming": refused(f"{_LOCAL_ONLY} and streams nothing; download the dataset first", False, None),
    "video": refused("stune's families train on images; stune has no video datasets", None),
    "audio": refused("stune's families train on images; stune has no audio datasets", None),
    "memory_filesystem_path": refused("stune keeps caches on disk (cache_dir); it mounts no RAM disk", None),
    "memory_filesystem_size": refused("stune mounts no RAM-disk cache, so there is no size to give it", None),
    "memory_filesystem_sudo": refused("stune never runs mount or sudo; remove the key", False, None),
}

#: Values of implemented dataset keys that stune refuses with a reason of their own.
DATASET_TYPE_REFUSALS: dict[str, str] = {
    "aws": f"{_LOCAL_ONLY}; sync the bucket to a folder (`aws s3 sync`) and use type local",
    "csv": f"{_LOCAL_ONLY}; download the CSV's URLs into a folder with .txt captions and use type local",
    "huggingface": f"{_LOCAL_ONLY}; export the Hub dataset to a folder of images and captions and use type local",
    "webshart": f"{_LOCAL_ONLY}; unpack the shards into a folder and use type local",
    "memory": "stune keeps its caches on disk; use type local with cache_dir",
}
DATASET_KIND_REFUSALS: dict[str, str] = {
    "video": "stune's families train on images; stune has no video datasets",
    "audio": "stune's families train on images; stune has no audio datasets",
    "image_embeds": "stune writes each image dataset's latents to its cache_dir_vae; remove this entry and set "
    "cache_dir_vae on the image dataset",
    "conditioning_image_embeds": "stune's families take no image-encoder conditioning; remove this entry",
    "caption": "stune reads captions with each image dataset's caption_strategy; remove this entry",
}


# -- applying the table ---------------------------------------------------------------------------------


def _accepts(row: Row, value: Any) -> bool:
    return any(same_value(value, n) for n in row.neutral)


def translate_options(raw: dict[str, Any], known: Mapping[str, str]) -> None:
    """Handle the SimpleTuner options of ``raw`` that stune has under another form, in place.

    ``differently`` options are removed (their value mapped onto stune options where the row says
    so, never over a value the configuration sets itself); ``refused`` ones raise a ConfigError
    naming the option and the reason, unless their value asks for nothing. Names stune knows, and
    names that are no SimpleTuner option, are left for the usual checks.
    """
    for key in list(raw):
        row = OPTION_ROWS.get(key)
        if key in known or row is None:
            continue
        value = raw.pop(key)
        _apply(key, value, row, raw, "option", known)


def translate_dataset_keys(raw: dict[str, Any], known: Mapping[str, str], where: str) -> None:
    """The same for one dataset entry of the dataset list (``where`` names it in messages)."""
    kind = raw.get("type")
    if isinstance(kind, str) and kind in DATASET_TYPE_REFUSALS:
        raise ConfigError(f"{where}: `type` {kind!r} is not supported by stune: {DATASET_TYPE_REFUSALS[kind]}.")
    dataset_type = raw.get("dataset_type")
    if isinstance(dataset_type, str) and dataset_type in DATASET_KIND_REFUSALS:
        raise ConfigError(
            f"{where}: `dataset_type` {dataset_type!r} is not supported by stune: {DATASET_KIND_REFUSALS[dataset_type]}."
        )
    for key in list(raw):
        row = DATASET_ROWS.get(key)
        if key in known or row is None:
            continue
        value = raw.pop(key)
        _apply(key, value, row, raw, f"dataset key ({where})", known)


def _apply(key: str, value: Any, row: Row, raw: dict[str, Any], what: str, known: Mapping[str, str]) -> None:
    if row.status == REFUSED:
        if _accepts(row, value):
            log.info("SimpleTuner %s `%s` = %r asks for nothing stune needs to do; ignored.", what, key, value)
            return
        raise ConfigError(f"SimpleTuner {what} `{key}` is not supported by stune: {row.reason}.")
    if row.only and not _accepts(row, value):
        raise ConfigError(f"SimpleTuner {what} `{key}` = {value!r} is not supported by stune: {row.refusal}.")
    mapped = row.maps(value) if row.maps is not None else {}
    for option, new in mapped.items():
        if option in raw or any(known.get(k) == option for k in raw):
            log.info("SimpleTuner %s `%s` not applied: the configuration sets `%s` itself.", what, key, option)
        else:
            raw[option] = new
    log.info("SimpleTuner %s `%s` accepted: %s", what, key, row.reason)


# -- the list and the tests that cover the implemented names -------------------------------------------

#: The options of SimpleTuner 4.10.1's `train` parser that concern image flow-matching transformers
#: (the list the issue counted; the test suite compares it with the reference file).
SIMPLETUNER_OPTIONS: tuple[str, ...] = (
    "accelerate_config",
    "accelerate_extra_args",
    "accelerator_cache_clear_interval",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "adam_weight_decay",
    "allow_dataset_oversubscription",
    "aspect_bucket_alignment",
    "aspect_bucket_disable_rebuild",
    "aspect_bucket_rounding",
    "aspect_bucket_worker_count",
    "assistant_lora_inference_strength",
    "assistant_lora_path",
    "assistant_lora_strength",
    "attention_mechanism",
    "base_model_default_dtype",
    "base_model_precision",
    "cache_dir",
    "cache_dir_text",
    "cache_dir_vae",
    "caption_dropout_probability",
    "caption_strategy",
    "checkpoint_epoch_interval",
    "checkpoint_step_interval",
    "checkpointing_rolling_steps",
    "checkpointing_use_tempdir",
    "checkpoints_rolling_total_limit",
    "checkpoints_total_limit",
    "compress_disk_cache",
    "conditioning_multidataset_sampling",
    "custom_text_encoder_intermediary_layers",
    "custom_tracker",
    "data_aesthetic_score",
    "data_backend_config",
    "data_backend_sampling",
    "dataloader_prefetch",
    "dataloader_prefetch_device_threshold_mb",
    "dataloader_prefetch_qlen",
    "debug_aspect_buckets",
    "debug_dataset_loader",
    "deepspeed_config",
    "delete_invalid_checkpoints",
    "delete_model_after_load",
    "delete_problematic_images",
    "delete_unwanted_images",
    "diffusion_blocks_config",
    "disable_assistant_lora",
    "disable_benchmark",
    "disable_bucket_pruning",
    "disable_segmented_timestep_sampling",
    "disable_tf32",
    "disk_low_action",
    "disk_low_script",
    "disk_low_threshold",
    "dynamo_backend",
    "dynamo_cache_export",
    "dynamo_cache_export_after_first_step",
    "dynamo_dynamic",
    "dynamo_fullgraph",
    "dynamo_hub_repo_id",
    "dynamo_mode",
    "dynamo_use_regional_compilation",
    "dynamo_wrapper",
    "ema_cpu_only",
    "ema_decay",
    "ema_device",
    "ema_foreach_disable",
    "ema_update_interval",
    "ema_validation",
    "ema_warmup_steps",
    "enable_chunked_feed_forward",
    "enable_multiprocessing",
    "eval_dataset_id",
    "eval_dataset_pooling",
    "eval_epoch_interval",
    "eval_loss_disable",
    "eval_steps_interval",
    "eval_timesteps",
    "evaluation_type",
    "feed_forward_chunk_size",
    "find_unused_parameters",
    "flow_beta_schedule_alpha",
    "flow_beta_schedule_beta",
    "flow_cubic_schedule_weights",
    "flow_custom_timesteps",
    "flow_schedule_auto_shift",
    "flow_schedule_shift",
    "flow_sigmoid_scale",
    "flow_timesteps_mode",
    "flow_use_beta_schedule",
    "flow_use_uniform_schedule",
    "flux_attention_masked_training",
    "flux_fast_schedule",
    "flux_guidance_max",
    "flux_guidance_min",
    "flux_guidance_mode",
    "flux_guidance_value",
    "flux_lora_target",
    "fsdp_activation_checkpointing",
    "fsdp_auto_wrap_policy",
    "fsdp_cpu_offload",
    "fsdp_cpu_ram_efficient_loading",
    "fsdp_enable",
    "fsdp_limit_all_gathers",
    "fsdp_reshard_after_forward",
    "fsdp_state_dict_type",
    "fsdp_transformer_layer_cls_to_wrap",
    "fsdp_version",
    "fully_unload_text_encoder",
    "fuse_optimizer",
    "fuse_qkv_projections",
    "grad_clip_method",
    "gradient_accumulation_steps",
    "gradient_checkpointing",
    "gradient_checkpointing_backend",
    "gradient_checkpointing_interval",
    "gradient_checkpointing_offload_attention",
    "gradient_checkpointing_offload_pin_memory_max_buckets",
    "gradient_checkpointing_offload_prefetch",
    "gradient_checkpointing_segment_stride",
    "gradient_precision",
    "hidream_load_balancing_loss_weight",
    "hidream_use_load_balancing_loss",
    "hub_model_id",
    "huber_c",
    "huber_schedule",
    "i_know_what_i_am_doing",
    "ignore_missing_files",
    "image_processing_batch_size",
    "inference_scheduler_timestep_spacing",
    "init_lokr_norm",
    "init_lora",
    "init_lora_ema",
    "init_lora_step",
    "instance_prompt",
    "keep_vae_loaded",
    "layer_freeze_strategy",
    "learning_rate",
    "local_rank",
    "logging_dir",
    "lora_alpha",
    "lora_dropout",
    "lora_format",
    "lora_init_type",
    "lora_rank",
    "lora_type",
    "loss_type",
    "lr_end",
    "lr_num_cycles",
    "lr_power",
    "lr_scale",
    "lr_scale_sqrt",
    "lr_scheduler",
    "lr_warmup_steps",
    "lycoris_config",
    "machine_rank",
    "main_process_ip",
    "main_process_port",
    "masked_loss_probability",
    "max_grad_norm",
    "max_train_steps",
    "max_upscale_threshold",
    "max_workers",
    "maximum_image_size",
    "metadata_update_interval",
    "minimum_image_size",
    "mixed_precision",
    "model_card_base_model",
    "model_card_note",
    "model_card_private",
    "model_card_safe_for_work",
    "model_family",
    "model_flavour",
    "model_type",
    "modelspec_comment",
    "musubi_block_swap_device",
    "musubi_blocks_to_swap",
    "num_eval_images",
    "num_machines",
    "num_processes",
    "num_train_epochs",
    "num_validation_images",
    "offload_during_save",
    "offload_during_startup",
    "offload_param_path",
    "only_instance_prompt",
    "optimizer",
    "optimizer_beta1",
    "optimizer_beta2",
    "optimizer_config",
    "optimizer_cpu_offload_method",
    "optimizer_offload_gradients",
    "optimizer_release_gradients",
    "output_dir",
    "override_dataset_config",
    "parquet_caption_column",
    "parquet_filename_column",
    "peft_lora_mode",
    "peft_lora_target_modules",
    "post_checkpoint_script",
    "post_upload_script",
    "prepend_instance_prompt",
    "preserve_data_backend_cache",
    "pretrained_evaluation_model_name_or_path",
    "pretrained_model_name_or_path",
    "pretrained_t5_model_name_or_path",
    "pretrained_transformer_model_name_or_path",
    "pretrained_transformer_subfolder",
    "pretrained_vae_model_name_or_path",
    "print_filenames",
    "print_sampler_statistics",
    "prodigy_steps",
    "publishing_config",
    "push_checkpoints_to_hub",
    "push_to_hub",
    "push_to_hub_background",
    "quantization_config",
    "quantize_activations",
    "quantize_via",
    "read_batch_size",
    "report_to",
    "resolution",
    "resolution_type",
    "resume_from_checkpoint",
    "revision",
    "sageattention_usage",
    "same_network",
    "save_text_encoder",
    "scheduled_sampling_max_step_offset",
    "scheduled_sampling_order",
    "scheduled_sampling_prob_end",
    "scheduled_sampling_prob_start",
    "scheduled_sampling_probability",
    "scheduled_sampling_ramp_shape",
    "scheduled_sampling_ramp_steps",
    "scheduled_sampling_reflexflow",
    "scheduled_sampling_reflexflow_alpha",
    "scheduled_sampling_reflexflow_beta1",
    "scheduled_sampling_reflexflow_beta2",
    "scheduled_sampling_sampler",
    "scheduled_sampling_start_step",
    "scheduled_sampling_strategy",
    "sd3_clip_uncond_behaviour",
    "sd3_t5_uncond_behaviour",
    "seed",
    "seed_for_each_device",
    "set_grads_to_none",
    "skip_file_discovery",
    "strict_epoch_limit",
    "t5_padding",
    "target_downsample_size",
    "text_cache_disable",
    "text_cache_ondemand",
    "text_embed_full_cache",
    "text_encoder_1_precision",
    "text_encoder_2_precision",
    "text_encoder_3_precision",
    "text_encoder_4_precision",
    "text_encoder_batch_size",
    "text_encoder_limit",
    "tokenizer_max_length",
    "torch_num_threads",
    "tracker_image_layout",
    "tracker_project_name",
    "tracker_run_name",
    "train_batch_size",
    "training_scheduler_timestep_spacing",
    "tread_config",
    "trust_remote_code",
    "use_dora",
    "use_ema",
    "user_prompt_library",
    "vae_batch_size",
    "vae_cache_disable",
    "vae_cache_ondemand",
    "vae_cache_scan_behaviour",
    "vae_dtype",
    "vae_enable_patch_conv",
    "vae_enable_slicing",
    "vae_enable_tiling",
    "validate_after_epoch",
    "validate_after_step",
    "validation_adapter_config",
    "validation_adapter_mode",
    "validation_adapter_name",
    "validation_adapter_path",
    "validation_adapter_strength",
    "validation_disable",
    "validation_disable_unconditional",
    "validation_epoch_interval",
    "validation_external_background",
    "validation_external_script",
    "validation_guidance",
    "validation_guidance_real",
    "validation_guidance_rescale",
    "validation_guidance_skip_layers",
    "validation_guidance_skip_layers_start",
    "validation_guidance_skip_layers_stop",
    "validation_guidance_skip_scale",
    "validation_image_format",
    "validation_image_quality",
    "validation_input",
    "validation_lycoris_strength",
    "validation_method",
    "validation_multigpu",
    "validation_negative_prompt",
    "validation_no_cfg_until_timestep",
    "validation_noise_scheduler",
    "validation_num_inference_steps",
    "validation_on_startup",
    "validation_preview",
    "validation_preview_steps",
    "validation_prompt",
    "validation_prompt_library",
    "validation_randomize",
    "validation_resolution",
    "validation_seed",
    "validation_seed_source",
    "validation_step_interval",
    "validation_using_datasets",
    "variant",
    "webhook_config",
    "webhook_reporting_interval",
    "write_batch_size",
)

#: implemented option → the test that shows it acts (`path::test`, or `test_name*`: a test function of
#: that name or prefix anywhere in the test tree).
OPTION_TESTS: dict[str, str] = {
    "gradient_checkpointing_offload_attention": "tests/test_simpletuner_section2.py::test_gradient_checkpointing_offload_attention*",
    "disable_bucket_pruning": "tests/test_simpletuner_section2.py::test_disable_bucket_pruning*",
    "flow_cubic_schedule_weights": "tests/test_simpletuner_section2.py::test_flow_cubic_schedule_weights*",
    "init_lora_ema": "tests/test_simpletuner_section2.py::test_init_lora_ema*",
    "init_lora_step": "tests/test_simpletuner_section2.py::test_init_lora_step*",
    "max_upscale_threshold": "tests/test_simpletuner_section2.py::test_max_upscale_threshold*",
    "modelspec_comment": "tests/test_simpletuner_section2.py::test_modelspec_comment*",
    "validation_adapter_config": "tests/test_simpletuner_section2.py::test_validation_adapter_config*",
    "validation_adapter_mode": "tests/test_simpletuner_section2.py::test_validation_adapter_path_name_and_mode_comparison_render_both_sets",
    "validation_adapter_name": "tests/test_simpletuner_section2.py::test_validation_adapter_path_name_and_mode_comparison_render_both_sets",
    "validation_adapter_path": "tests/test_simpletuner_section2.py::test_validation_adapter_path_name_and_mode_comparison_render_both_sets",
    "validation_adapter_strength": "tests/test_simpletuner_section2.py::test_validation_adapter_strength*",
    "validation_prompt_library": "tests/test_simpletuner_section2.py::test_validation_prompt_library*",
    "validation_method": "tests/test_simpletuner_compat.py::test_validation_external_script_in_a_toy_run",
    "validation_external_script": "tests/test_simpletuner_compat.py::test_validation_external_script_in_a_toy_run",
    "validation_external_background": "tests/test_simpletuner_compat.py::test_validation_external_script_in_a_toy_run",
    "flow_custom_timesteps": "tests/test_simpletuner_compat.py::test_option_acts[flow_custom_timesteps]",
    "masked_loss_probability": "tests/test_simpletuner_compat.py::test_masked_loss_probability",
    "post_checkpoint_script": "tests/test_simpletuner_compat.py::test_post_checkpoint_script_and_validate_after_step_in_a_toy_run",
    "validate_after_step": "tests/test_simpletuner_compat.py::test_post_checkpoint_script_and_validate_after_step_in_a_toy_run",
    "validate_after_epoch": "tests/test_simpletuner_compat.py::test_validate_after_epoch",
    "post_upload_script": "tests/test_simpletuner_compat.py::test_post_upload_script_after_the_upload",
    "publishing_config": "plugins/publish/tests/test_publish.py::test_a_run_publishes_its_outputs_to_every_provider",
    "prepend_instance_prompt": "tests/test_simpletuner_compat.py::test_global_dataset_options",
    "only_instance_prompt": "tests/test_simpletuner_compat.py::test_global_dataset_options",
    "skip_file_discovery": "tests/test_simpletuner_compat.py::test_global_dataset_options",
    "validation_image_quality": "tests/test_simpletuner_options.py::test_validation_image_quality*",
    "accelerate_config": "core/tests/test_memory.py::test_num_processes_relaunches_through_accelerate",
    "accelerate_extra_args": "core/tests/test_memory.py::test_num_processes_relaunches_through_accelerate",
    "adam_beta1": "core/tests/test_optim.py::test_options_then_generic_betas_then_optimizer_config",
    "adam_beta2": "core/tests/test_optim.py::test_options_then_generic_betas_then_optimizer_config",
    "adam_epsilon": "core/tests/test_optim.py::test_options_then_generic_betas_then_optimizer_config",
    "adam_weight_decay": "core/tests/test_optim.py::test_options_then_generic_betas_then_optimizer_config",
    "aspect_bucket_rounding": "tests/test_option_effects.py::test_aspect_bucket_rounding_decides_which_aspects_share_a_bucket",
    "assistant_lora_inference_strength": "plugins/flux/tests/test_flux_simpletuner.py::test_assistant_lora_inference_strength*",
    "assistant_lora_path": "plugins/flux/tests/test_flux_simpletuner.py::test_assistant_lora_path*",
    "assistant_lora_strength": "plugins/flux/tests/test_flux_simpletuner.py::test_assistant_lora_strength*",
    "attention_mechanism": "tests/test_memory.py::test_speed_and_placement_options_in_one_run",
    "base_model_default_dtype": "plugins/flux/tests/test_flux_schedules.py::test_base_model_default_dtype",
    "base_model_precision": "plugins/quant/tests/test_precisions.py::test_base_model_precision_bf16_loads_the_base_in_bf16",
    "cache_dir": "tests/test_option_effects.py::test_cache_dir_cache_dir_vae_and_cache_dir_text_place_the_caches",
    "cache_dir_text": "tests/test_option_effects.py::test_cache_dir_cache_dir_vae_and_cache_dir_text_place_the_caches",
    "cache_dir_vae": "tests/test_option_effects.py::test_cache_dir_cache_dir_vae_and_cache_dir_text_place_the_caches",
    "caption_dropout_probability": "plugins/sd3/tests/test_sd3_training.py::test_dropped_captions_train_on_zero_clip_and_empty_t5",
    "caption_strategy": "core/tests/test_datasets.py::test_prepend_and_only_instance_prompt",
    "checkpoint_epoch_interval": "tests/test_simpletuner_options.py::test_checkpoint_epoch_interval*",
    "checkpoint_step_interval": "tests/test_anchor_configs.py::test_the_anchor_config_trains_unchanged",
    "checkpointing_rolling_steps": "test_checkpointing_rolling_steps*",
    "checkpoints_rolling_total_limit": "test_checkpoints_rolling_total_limit*",
    "checkpoints_total_limit": "tests/test_option_effects.py::test_checkpoints_total_limit_keeps_the_newest",
    "data_backend_config": "tests/test_anchor_configs.py::test_the_anchor_config_trains_unchanged",
    "deepspeed_config": "tests/test_distributed_config.py::test_deepspeed_config_becomes_accelerates_deepspeed_plugin",
    "disable_assistant_lora": "plugins/flux/tests/test_flux_simpletuner.py::test_disable_assistant_lora*",
    "disable_benchmark": "plugins/flux/tests/test_flux_validation.py::test_disable_benchmark_and_validation_disable",
    "disable_tf32": "core/tests/test_memory.py::test_tf32_and_threads",
    "disk_low_action": "core/tests/test_simpletuner_options.py::test_disk_low_action*",
    "disk_low_script": "core/tests/test_simpletuner_options.py::test_disk_low_script*",
    "disk_low_threshold": "test_disk_low_threshold*",
    "dynamo_backend": "tests/test_memory.py::test_compiled_lora_trains_and_loads_in_diffusers",
    "dynamo_dynamic": "tests/test_simpletuner_compat.py::test_option_acts[dynamo_dynamic]",
    "dynamo_fullgraph": "tests/test_simpletuner_compat.py::test_option_acts[dynamo_fullgraph]",
    "dynamo_mode": "tests/test_simpletuner_compat.py::test_dynamo_mode_reaches_torch_compile",
    "dynamo_use_regional_compilation": "tests/test_option_effects.py::test_dynamo_use_regional_compilation_compiles_each_block_instead_of_the_whole_model",
    "ema_decay": "plugins/flux/tests/test_flux_adapters.py::test_ema_resume_is_exact",
    "ema_device": "tests/test_simpletuner_compat.py::test_vae_batch_size_and_ema_update_interval_in_a_toy_run",
    "ema_update_interval": "tests/test_simpletuner_compat.py::test_vae_batch_size_and_ema_update_interval_in_a_toy_run",
    "ema_validation": "plugins/flux/tests/test_flux_adapters.py::test_ema_validation_modes",
    "ema_warmup_steps": "test_ema_warmup_steps*",
    "enable_chunked_feed_forward": "tests/test_memory.py::test_speed_and_placement_options_in_one_run",
    "eval_dataset_id": "core/tests/test_validation.py::test_eval_samples_first_by_path_and_dataset_choice",
    "eval_dataset_pooling": "tests/test_simpletuner_options.py::test_eval_dataset_pooling*",
    "eval_epoch_interval": "tests/test_simpletuner_options.py::test_eval_epoch_interval*",
    "eval_loss_disable": "plugins/flux/tests/test_flux_validation.py::test_same_weights_give_the_same_eval_loss",
    "eval_steps_interval": "plugins/flux/tests/test_flux_validation.py::test_eval_loss_in_metrics_at_its_interval",
    "eval_timesteps": "plugins/flux/tests/test_flux_validation.py::test_eval_loss_in_metrics_at_its_interval",
    "evaluation_type": "tests/test_simpletuner_integrations.py::test_evaluation_type*",
    "feed_forward_chunk_size": "tests/test_memory.py::test_speed_and_placement_options_in_one_run",
    "flow_beta_schedule_alpha": "tests/test_simpletuner_compat.py::test_option_acts[flow_beta_schedule_alpha]",
    "flow_beta_schedule_beta": "tests/test_simpletuner_compat.py::test_option_acts[flow_beta_schedule_beta]",
    "flow_schedule_auto_shift": "tests/test_option_effects.py::test_flow_schedule_shift_and_auto_shift_move_the_drawn_sigmas",
    "flow_schedule_shift": "tests/test_option_effects.py::test_flow_schedule_shift_and_auto_shift_move_the_drawn_sigmas",
    "flow_sigmoid_scale": "tests/test_simpletuner_compat.py::test_option_acts[flow_sigmoid_scale]",
    "flow_use_beta_schedule": "tests/test_simpletuner_compat.py::test_option_acts[flow_use_beta_schedule]",
    "flow_use_uniform_schedule": "tests/test_simpletuner_compat.py::test_option_acts[flow_use_uniform_schedule]",
    "flux_attention_masked_training": "plugins/flux/tests/test_flux.py::test_attention_mask_and_t5_zero_padding",
    "flux_fast_schedule": "plugins/flux/tests/test_flux_schedules.py::test_fast_schedule_draws_from_schnells_table",
    "flux_guidance_max": "plugins/flux/tests/test_flux_schedules.py::test_random_range_guidance",
    "flux_guidance_min": "plugins/flux/tests/test_flux_schedules.py::test_random_range_guidance",
    "flux_guidance_mode": "plugins/flux/tests/test_flux_schedules.py::test_random_range_guidance",
    "flux_guidance_value": "plugins/flux/tests/test_flux_schedules.py::test_random_range_guidance",
    "flux_lora_target": "plugins/flux/tests/test_flux.py::test_lora_target_presets",
    "fsdp_activation_checkpointing": "tests/test_distributed_config.py::test_fsdp_trains_and_resumes_sharded_and_in_one_process",
    "fsdp_auto_wrap_policy": "core/tests/test_memory.py::test_fsdp_units_follow_the_wrap_policy",
    "fsdp_cpu_offload": "tests/test_option_effects.py::test_fsdp_cpu_offload_offloads_the_sharded_parameters",
    "fsdp_cpu_ram_efficient_loading": "tests/test_distributed_config.py::test_fsdp_trains_and_resumes_sharded_and_in_one_process",
    "fsdp_enable": "tests/test_distributed_config.py::test_fsdp_trains_and_resumes_sharded_and_in_one_process",
    "fsdp_limit_all_gathers": "tests/test_simpletuner_compat.py::test_option_acts[fsdp_limit_all_gathers]",
    "fsdp_reshard_after_forward": "tests/test_simpletuner_compat.py::test_option_acts[fsdp_reshard_after_forward]",
    "fsdp_state_dict_type": "tests/test_distributed_config.py::test_fsdp_trains_and_resumes_sharded_and_in_one_process",
    "fsdp_transformer_layer_cls_to_wrap": "core/tests/test_memory.py::test_fsdp_units_follow_the_wrap_policy",
    "fsdp_version": "tests/test_distributed_config.py::test_fsdp_trains_and_resumes_sharded_and_in_one_process",
    "fully_unload_text_encoder": "core/tests/test_memory.py::test_placement_moves_the_vae_and_encoders_at_phase_boundaries",
    "fuse_optimizer": "tests/test_memory.py::test_fused_backward_pass_gives_the_plain_full_finetune",
    "fuse_qkv_projections": "tests/test_memory.py::test_speed_and_placement_options_in_one_run",
    "grad_clip_method": "tests/test_option_effects.py::test_grad_clip_method_and_max_grad_norm_clip_what_the_optimizer_steps_with",
    "gradient_accumulation_steps": "plugins/flux/tests/test_flux_options.py::test_gradient_accumulation_counts_optimizer_steps",
    "gradient_checkpointing": "tests/test_memory.py::test_leaf_level_group_offload_without_checkpointing",
    "gradient_checkpointing_interval": "plugins/flux/tests/test_flux_schedules.py::test_gradient_checkpointing_interval",
    "hidream_load_balancing_loss_weight": "plugins/hidream/tests/test_hidream_model.py::test_load_balancing_loss_has_its_own_gradient",
    "hidream_use_load_balancing_loss": "plugins/hidream/tests/test_hidream_model.py::test_load_balancing_loss_has_its_own_gradient",
    "hub_model_id": "tests/test_hub_upload.py::test_checkpoints_go_up_as_they_are_saved_then_the_outputs",
    "huber_c": "core/tests/test_simpletuner_options.py::test_huber_c*",
    "huber_schedule": "core/tests/test_simpletuner_options.py::test_huber_schedule*",
    "i_know_what_i_am_doing": "plugins/hidream/tests/test_hidream_options.py::test_t5_token_limit",
    "ignore_missing_files": "core/tests/test_simpletuner_options.py::test_ignore_missing_files*",
    "init_lokr_norm": "plugins/flux/tests/test_flux_adapters.py::test_init_lokr_norm",
    "init_lora": "plugins/flux/tests/test_flux_adapters.py::test_init_lora_starts_from_a_previous_adapter",
    "instance_prompt": "core/tests/test_datasets.py::test_prepend_and_only_instance_prompt",
    "keep_vae_loaded": "core/tests/test_memory.py::test_placement_moves_the_vae_and_encoders_at_phase_boundaries",
    "learning_rate": "core/tests/test_optim.py::test_simpletuner_defaults_per_optimizer",
    "logging_dir": "core/tests/test_tracking.py::test_logging_dir_and_default_run_name",
    "lora_alpha": "plugins/flux/tests/test_flux.py::test_cli_trains_a_lora_that_loads_in_diffusers",
    "lora_dropout": "tests/test_option_effects.py::test_lora_dropout_drops_the_adapter_path_while_training",
    "lora_format": "plugins/flux/tests/test_flux_simpletuner.py::test_lora_format*",
    "lora_init_type": "tests/test_option_effects.py::test_lora_init_type_initialises_the_adapter_as_peft_does",
    "lora_rank": "plugins/flux/tests/test_flux.py::test_cli_trains_a_lora_that_loads_in_diffusers",
    "lora_type": "plugins/flux/tests/test_flux_adapters.py::test_seed_lokr_trains_and_loads_with_lycoris",
    "loss_type": "test_loss_type*",
    "lr_end": "core/tests/test_optim.py::test_schedules",
    "lr_num_cycles": "core/tests/test_optim.py::test_schedules",
    "lr_power": "core/tests/test_optim.py::test_schedules",
    "lr_scale": "test_lr_scale*",
    "lr_scale_sqrt": "core/tests/test_simpletuner_options.py::test_lr_scale_sqrt*",
    "lr_scheduler": "core/tests/test_optim.py::test_schedules",
    "lr_warmup_steps": "core/tests/test_optim.py::test_schedules",
    "lycoris_config": "plugins/flux/tests/test_flux_adapters.py::test_seed_lokr_trains_and_loads_with_lycoris",
    "machine_rank": "core/tests/test_memory.py::test_num_processes_relaunches_through_accelerate",
    "main_process_ip": "core/tests/test_memory.py::test_num_processes_relaunches_through_accelerate",
    "main_process_port": "core/tests/test_memory.py::test_num_processes_relaunches_through_accelerate",
    "max_grad_norm": "tests/test_option_effects.py::test_grad_clip_method_and_max_grad_norm_clip_what_the_optimizer_steps_with",
    "max_train_steps": "tests/test_anchor_configs.py::test_the_anchor_config_trains_unchanged",
    "maximum_image_size": "core/tests/test_buckets.py::test_large_images_are_downsampled_before_cropping",
    "minimum_image_size": "core/tests/test_datasets.py::test_size_and_aspect_filters",
    "mixed_precision": "plugins/flux/tests/test_flux_options.py::test_bf16_mixed_precision_keeps_adapter_in_fp32",
    "model_card_note": "core/tests/test_publish.py::test_model_card_for_a_hub_base_model",
    "model_card_private": "tests/test_option_effects.py::test_model_card_private_creates_a_private_or_public_repository",
    "model_card_safe_for_work": "core/tests/test_publish.py::test_model_card_for_a_local_base_model_reads_its_license",
    "model_family": "tests/test_option_effects.py::test_model_family_chooses_the_family_that_trains",
    "model_flavour": "plugins/sd3/tests/test_sd3_family.py::test_unreachable_hub_id_is_a_user_error",
    "model_type": "plugins/flux/tests/test_flux_adapters.py::test_full_finetune_exports_a_diffusers_transformer",
    "musubi_block_swap_device": "tests/test_simpletuner_compat.py::test_vae_batch_size_and_ema_update_interval_in_a_toy_run",
    "musubi_blocks_to_swap": "tests/test_memory.py::test_block_swap_runs_each_swapped_block_in_place",
    "num_eval_images": "plugins/flux/tests/test_flux_validation.py::test_same_weights_give_the_same_eval_loss",
    "num_machines": "core/tests/test_memory.py::test_num_processes_relaunches_through_accelerate",
    "num_processes": "core/tests/test_memory.py::test_num_processes_relaunches_through_accelerate",
    "num_train_epochs": "plugins/flux/tests/test_flux_options.py::test_epochs_without_max_steps",
    "num_validation_images": "plugins/flux/tests/test_flux_validation.py::test_images_for_every_nickname_at_every_scheduled_step",
    "offload_during_save": "tests/test_memory.py::test_speed_and_placement_options_in_one_run",
    "offload_during_startup": "tests/test_memory.py::test_speed_and_placement_options_in_one_run",
    "optimizer": "core/tests/test_optim.py::test_optimizers_step",
    "optimizer_beta1": "core/tests/test_optim.py::test_options_then_generic_betas_then_optimizer_config",
    "optimizer_beta2": "core/tests/test_optim.py::test_options_then_generic_betas_then_optimizer_config",
    "optimizer_config": "core/tests/test_optim.py::test_options_then_generic_betas_then_optimizer_config",
    "optimizer_cpu_offload_method": "tests/test_simpletuner_compat.py::test_option_acts[optimizer_cpu_offload_method]",
    "optimizer_offload_gradients": "tests/test_simpletuner_compat.py::test_option_acts[optimizer_offload_gradients]",
    "optimizer_release_gradients": "tests/test_memory.py::test_fused_backward_pass_gives_the_plain_full_finetune",
    "output_dir": "tests/test_anchor_configs.py::test_the_anchor_config_trains_unchanged",
    "parquet_caption_column": "core/tests/test_simpletuner_options.py::test_parquet_caption_column*",
    "parquet_filename_column": "core/tests/test_simpletuner_options.py::test_parquet_filename_column*",
    "peft_lora_target_modules": "plugins/flux/tests/test_flux.py::test_peft_target_modules_override",
    "pretrained_evaluation_model_name_or_path": "tests/test_simpletuner_integrations.py::test_evaluation_type_clip_scores_every_validation",
    "pretrained_model_name_or_path": "tests/test_anchor_configs.py::test_the_anchor_config_trains_unchanged",
    "pretrained_transformer_model_name_or_path": "plugins/flux/tests/test_flux_options.py::test_separate_transformer_and_vae_paths",
    "pretrained_transformer_subfolder": "plugins/flux/tests/test_flux_options.py::test_separate_transformer_and_vae_paths",
    "pretrained_vae_model_name_or_path": "plugins/flux/tests/test_flux_options.py::test_separate_transformer_and_vae_paths",
    "prodigy_steps": "core/tests/test_optim.py::test_prodigy_stops_adapting_after_prodigy_steps",
    "push_checkpoints_to_hub": "tests/test_hub_upload.py::test_checkpoints_go_up_as_they_are_saved_then_the_outputs",
    "push_to_hub_background": "tests/test_hub_upload.py::test_checkpoints_go_up_as_they_are_saved_then_the_outputs",
    "push_to_hub": "tests/test_hub_upload.py::test_without_push_checkpoints_to_hub_only_the_outputs_go_up",
    "quantization_config": "plugins/quant/tests/test_adapters_and_resume.py::test_quantization_config_quantizes_while_loading",
    "quantize_via": "plugins/quant/tests/test_adapters_and_resume.py::test_quantize_via_pipeline_loads_int8_torchao_through_diffusers",
    "report_to": "core/tests/test_tracking.py::test_logging_dir_and_default_run_name",
    "resolution": "plugins/flux/tests/test_flux.py::test_second_run_encodes_nothing_and_resolution_change_reencodes",
    "resolution_type": "core/tests/test_buckets.py::test_small_images_are_upscaled_to_cover",
    "resume_from_checkpoint": "plugins/quant/tests/test_adapters_and_resume.py::test_resume_with_a_quantized_base_equals_an_uninterrupted_run",
    "revision": "tests/test_simpletuner_compat.py::test_option_acts[revision]",
    "sageattention_usage": "tests/test_option_effects.py::test_sageattention_usage_chooses_the_phase_that_gets_the_kernel",
    "scheduled_sampling_max_step_offset": "plugins/rollout/tests/test_rollout_options.py::test_plan_strategies_probability_and_the_clamp_at_pure_noise",
    "scheduled_sampling_order": "plugins/rollout/tests/test_rollout_options.py::test_warnings_for_settings_that_cannot_act",
    "scheduled_sampling_prob_end": "plugins/rollout/tests/test_rollout_options.py::test_probability_fixed_or_ramped",
    "scheduled_sampling_prob_start": "plugins/rollout/tests/test_rollout_options.py::test_probability_fixed_or_ramped",
    "scheduled_sampling_probability": "plugins/rollout/tests/test_rollout_options.py::test_probability_fixed_or_ramped",
    "scheduled_sampling_ramp_shape": "plugins/rollout/tests/test_rollout_options.py::test_probability_fixed_or_ramped",
    "scheduled_sampling_ramp_steps": "plugins/rollout/tests/test_rollout_options.py::test_probability_fixed_or_ramped",
    "scheduled_sampling_reflexflow": "plugins/rollout/tests/test_rollout_flux.py::test_reflexflow_terms_are_in_the_loss",
    "scheduled_sampling_reflexflow_alpha": "plugins/rollout/tests/test_rollout_options.py::test_reflexflow_terms_match_simpletuners_loss",
    "scheduled_sampling_reflexflow_beta1": "tests/test_option_effects.py::test_scheduled_sampling_reflexflow_beta1_weighs_the_drift_term",
    "scheduled_sampling_reflexflow_beta2": "plugins/rollout/tests/test_rollout_options.py::test_reflexflow_terms_match_simpletuners_loss",
    "scheduled_sampling_sampler": "plugins/rollout/tests/test_rollout_options.py::test_warnings_for_settings_that_cannot_act",
    "scheduled_sampling_start_step": "plugins/rollout/tests/test_rollout_options.py::test_probability_fixed_or_ramped",
    "scheduled_sampling_strategy": "plugins/rollout/tests/test_rollout_options.py::test_plan_strategies_probability_and_the_clamp_at_pure_noise",
    "sd3_clip_uncond_behaviour": "plugins/sd3/tests/test_sd3_family.py::test_dropped_caption_embeddings_follow_the_uncond_options",
    "sd3_t5_uncond_behaviour": "plugins/sd3/tests/test_sd3_family.py::test_dropped_caption_embeddings_follow_the_uncond_options",
    "seed": "tests/test_option_effects.py::test_seed_decides_the_training_draws",
    "set_grads_to_none": "tests/test_memory.py::test_speed_and_placement_options_in_one_run",
    "t5_padding": "plugins/sd3/tests/test_sd3_family.py::test_t5_padding_zero",
    "target_downsample_size": "core/tests/test_buckets.py::test_large_images_are_downsampled_before_cropping",
    "text_encoder_1_precision": "tests/test_seams.py::test_post_load_quantizer_goes_block_by_block_and_honours_exclusions",
    "text_encoder_2_precision": "plugins/quant/tests/test_seed_and_slots.py::test_four_encoder_slots_each_take_their_precision_and_exclusions",
    "text_encoder_3_precision": "plugins/sd3/tests/test_sd3_quant.py::test_text_encoder_slots_are_quantized_by_their_precision_options",
    "text_encoder_4_precision": "plugins/quant/tests/test_seed_and_slots.py::test_four_encoder_slots_each_take_their_precision_and_exclusions",
    "text_encoder_batch_size": "tests/test_resume.py::test_sigkill_while_caching_leaves_no_corrupt_entry",
    "tokenizer_max_length": "plugins/hidream/tests/test_hidream_options.py::test_text_cache_holds_real_tokens_of_the_layers_read",
    "torch_num_threads": "core/tests/test_memory.py::test_tf32_and_threads",
    "tracker_project_name": "core/tests/test_tracking.py::test_wandb_offline_without_key_writes_history_config_and_images",
    "tracker_run_name": "core/tests/test_tracking.py::test_tensorboard_scalars_images_and_hparams",
    "train_batch_size": "plugins/flux/tests/test_flux_options.py::test_gradient_accumulation_counts_optimizer_steps",
    "tread_config": "plugins/tread/tests/test_tread.py::test_the_seed_block_trains_resumes_exactly_and_the_lora_loads",
    "use_dora": "plugins/flux/tests/test_flux_adapters.py::test_dora_loads_in_diffusers",
    "use_ema": "plugins/flux/tests/test_flux_adapters.py::test_ema_validation_modes",
    "user_prompt_library": "core/tests/test_validation.py::test_every_prompt_is_cached_negative_included",
    "vae_batch_size": "tests/test_simpletuner_compat.py::test_vae_batch_size_and_ema_update_interval_in_a_toy_run",
    "vae_dtype": "tests/test_memory.py::test_speed_and_placement_options_in_one_run",
    "vae_enable_slicing": "tests/test_memory.py::test_speed_and_placement_options_in_one_run",
    "vae_enable_tiling": "tests/test_memory.py::test_speed_and_placement_options_in_one_run",
    "validation_disable": "plugins/flux/tests/test_flux_validation.py::test_disable_benchmark_and_validation_disable",
    "validation_epoch_interval": "tests/test_simpletuner_options.py::test_validation_epoch_interval*",
    "validation_guidance": "plugins/flux/tests/test_flux_validation.py::test_validation_guidance_is_the_guidance_flux_renders_with",
    "validation_guidance_real": "plugins/flux/tests/test_flux_validation.py::test_true_cfg",
    "validation_guidance_skip_layers": "plugins/sd3/tests/test_sd3_family.py::test_skip_layer_guidance_runs_on_the_steps_inside_the_window_only",
    "validation_guidance_skip_layers_start": "plugins/sd3/tests/test_sd3_family.py::test_skip_layer_guidance_runs_on_the_steps_inside_the_window_only",
    "validation_guidance_skip_layers_stop": "plugins/sd3/tests/test_sd3_family.py::test_skip_layer_guidance_runs_on_the_steps_inside_the_window_only",
    "validation_guidance_skip_scale": "plugins/sd3/tests/test_sd3_family.py::test_validation_guidance_skip_scale_is_diffusers_skip_layer_guidance_scale",
    "validation_image_format": "tests/test_simpletuner_options.py::test_validation_image_format*",
    "validation_input": "plugins/flux/tests/test_flux_kontext.py::test_a_kontext_lora_trains_on_pairs_and_loads_in_the_kontext_pipeline",
    "validation_negative_prompt": "core/tests/test_validation.py::test_every_prompt_is_cached_negative_included",
    "validation_no_cfg_until_timestep": "plugins/flux/tests/test_flux_validation.py::test_true_cfg",
    "validation_noise_scheduler": "tests/test_simpletuner_options.py::test_validation_noise_scheduler*",
    "validation_num_inference_steps": "plugins/sd3/tests/test_sd3_family.py::test_skip_layer_guidance_runs_on_the_steps_inside_the_window_only",
    "validation_on_startup": "tests/test_simpletuner_options.py::test_validation_on_startup*",
    "validation_preview": "plugins/flux/tests/test_flux_validation_extras.py::test_previews_every_n_sampling_steps",
    "validation_preview_steps": "plugins/flux/tests/test_flux_simpletuner.py::test_validation_preview_steps*",
    "validation_prompt": "core/tests/test_validation.py::test_every_prompt_is_cached_negative_included",
    "validation_resolution": "plugins/flux/tests/test_flux_adapters.py::test_ema_validation_modes",
    "validation_seed": "tests/test_option_effects.py::test_validation_seed_sets_the_starting_noise_of_validation_images",
    "validation_step_interval": "plugins/sd3/tests/test_sd3_cli.py::test_fresh_environment_lists_only_sd3_and_trains_a_lora_that_loads_in_diffusers",
    "webhook_config": "tests/test_simpletuner_integrations.py::test_webhook_config*",
    "webhook_reporting_interval": "tests/test_simpletuner_integrations.py::test_webhook_reporting_interval*",
    "write_batch_size": "tests/test_simpletuner_compat.py::test_option_acts[write_batch_size]",
}

#: implemented dataset key → the test that shows it acts.
DATASET_KEY_TESTS: dict[str, str] = {
    "max_upscale_threshold": "tests/test_simpletuner_section2.py::test_max_upscale_threshold*",
    "id": "core/tests/test_datasets.py::test_masks_are_paired_by_name",
    "type": "tests/test_simpletuner_compat.py::test_dataset_storage_types_are_refused_by_name",
    "dataset_type": "core/tests/test_datasets.py::test_masks_are_paired_by_name",
    "disabled": "tests/test_simpletuner_compat.py::test_dataset_keys_act",
    "disable": "tests/test_simpletuner_compat.py::test_dataset_keys_act",
    "instance_data_dir": "core/tests/test_datasets.py::test_size_and_aspect_filters",
    "resolution": "core/tests/test_buckets.py::test_square_crop_styles",
    "resolution_type": "core/tests/test_buckets.py::test_small_images_are_upscaled_to_cover",
    "minimum_image_size": "core/tests/test_datasets.py::test_size_and_aspect_filters",
    "maximum_image_size": "core/tests/test_buckets.py::test_large_images_are_downsampled_before_cropping",
    "target_downsample_size": "core/tests/test_buckets.py::test_large_images_are_downsampled_before_cropping",
    "minimum_aspect_ratio": "tests/test_option_effects.py::test_minimum_aspect_ratio_skips_tall_images",
    "maximum_aspect_ratio": "core/tests/test_datasets.py::test_size_and_aspect_filters",
    "crop": "core/tests/test_buckets.py::test_square_crop_styles",
    "crop_aspect": "core/tests/test_buckets.py::test_closest_and_random_crop_aspects",
    "crop_aspect_buckets": "core/tests/test_buckets.py::test_closest_and_random_crop_aspects",
    "crop_style": "core/tests/test_buckets.py::test_square_crop_styles",
    "caption_strategy": "core/tests/test_datasets.py::test_prepend_and_only_instance_prompt",
    "instance_prompt": "core/tests/test_datasets.py::test_prepend_and_only_instance_prompt",
    "prepend_instance_prompt": "core/tests/test_datasets.py::test_prepend_and_only_instance_prompt",
    "only_instance_prompt": "core/tests/test_datasets.py::test_prepend_and_only_instance_prompt",
    "caption_shuffle": "tests/test_simpletuner_compat.py::test_caption_shuffle",
    "caption_filter_list": "tests/test_simpletuner_compat.py::test_caption_filter_list",
    "disable_multiline_split": "tests/test_simpletuner_compat.py::test_disable_multiline_split",
    "repeats": "tests/test_option_effects.py::test_repeats_train_batch_size_and_probability_shape_the_epoch",
    "max_num_samples": "core/tests/test_datasets.py::test_max_num_samples_is_a_fixed_subset",
    "probability": "tests/test_option_effects.py::test_repeats_train_batch_size_and_probability_shape_the_epoch",
    "is_regularisation_data": "tests/test_datasets_e2e.py::test_regularisation_target_is_the_base_model_prediction",
    "is_regularization_data": "tests/test_simpletuner_compat.py::test_dataset_keys_act",
    "metadata_backend": "core/tests/test_datasets.py::test_jsonl_captions_and_sizes_without_opening_images",
    "parquet": "core/tests/test_datasets.py::test_parquet_file",
    "cache_dir_vae": "tests/test_option_effects.py::test_cache_dir_cache_dir_vae_and_cache_dir_text_place_the_caches",
    "cache_dir": "tests/test_option_effects.py::test_cache_dir_cache_dir_vae_and_cache_dir_text_place_the_caches",
    "default": "tests/test_simpletuner_compat.py::test_dataset_keys_act",
    "write_batch_size": "tests/test_simpletuner_compat.py::test_dataset_keys_act",
    "hash_filenames": "core/tests/test_datasets.py::test_readable_cache_names_mirror_the_dataset",
    "skip_file_discovery": "core/tests/test_simpletuner_options.py::test_ignore_missing_files",
    "conditioning_type": "core/tests/test_datasets.py::test_masks_are_paired_by_name",
    "conditioning_data": "core/tests/test_datasets.py::test_masks_are_paired_by_name",
    "source_dataset_id": "tests/test_simpletuner_compat.py::test_dataset_keys_act",
    "train_batch_size": "tests/test_option_effects.py::test_repeats_train_batch_size_and_probability_shape_the_epoch",
}


@dataclass(frozen=True)
class Status:
    """One line of docs/simpletuner-compat.md."""

    name: str
    status: str  # IMPLEMENTED, PLUGIN, DIFFERENTLY, REFUSED, or "missing" (a gap the tests report)
    owner: str = ""  # implemented: core or the plugin whose option it is; plugin: the catalog entry
    reason: str = ""
    stune: str = ""
    test: str = ""
    accepted: tuple[Any, ...] = ()  # refused: values accepted as asking nothing; differently+only: values


def option_statuses(host: PluginHost) -> list[Status]:
    """The status of every SimpleTuner option with the plugins ``host`` has loaded."""
    from stune.config import CoreOptions
    from stune.options import option_names

    owners = {key: "core" for key in option_names(CoreOptions)}
    for plugin, model in host.option_models:
        for key in option_names(model):
            owners.setdefault(key, plugin)
    out = []
    for name in SIMPLETUNER_OPTIONS:
        if name in owners:
            out.append(Status(name, IMPLEMENTED, owners[name], stune=name, test=OPTION_TESTS.get(name, "")))
            continue
        entry = next((e for e in host.catalog.values() if name in e.options), None)
        if entry is not None:
            reason = f"belongs to the `{entry.name}` plugin: install it with `pip install {entry.distribution}`."
            out.append(Status(name, PLUGIN, entry.name, reason, name, OPTION_TESTS.get(name, "")))
        elif name in OPTION_ROWS:
            out.append(_row_status(name, OPTION_ROWS[name]))
        else:
            out.append(Status(name, "missing"))
    return out


def dataset_key_statuses() -> list[Status]:
    from stune.data.config import DatasetConfig
    from stune.options import option_names

    known = option_names(DatasetConfig)
    out = []
    for key in SIMPLETUNER_DATASET_KEYS:
        if key in known:
            out.append(Status(key, IMPLEMENTED, "core", stune=known[key], test=DATASET_KEY_TESTS.get(key, "")))
        elif key in DATASET_ROWS:
            out.append(_row_status(key, DATASET_ROWS[key]))
        else:
            out.append(Status(key, "missing"))
    return out


def _row_status(name: str, row: Row) -> Status:
    reason = row.reason if row.reason.endswith(".") else row.reason + "."
    if row.only:
        reason += f" Other values are refused: {row.refusal}."
    return Status(name, row.status, reason=reason, stune=row.stune, accepted=row.neutral)


def counts(statuses: list[Status]) -> dict[str, int]:
    out = {IMPLEMENTED: 0, PLUGIN: 0, DIFFERENTLY: 0, REFUSED: 0, "missing": 0}
    for status in statuses:
        out[status.status] += 1
    return out


# -- docs/simpletuner-compat.md ---------------------------------------------------------------------------


def compat_markdown(host: PluginHost) -> str:
    """docs/simpletuner-compat.md (``st-train options --simpletuner``)."""
    options = option_statuses(host)
    keys = dataset_key_statuses()
    n, k = counts(options), counts(keys)
    by_plugin = sum(1 for s in options if s.status == IMPLEMENTED and s.owner != "core")
    lines = [
        "# SimpleTuner compatibility",
        "",
        "Generated from `stune.simpletuner` by `st-train options --simpletuner` (with every first-party plugin "
        "installed); `tests/test_simpletuner_compat.py` regenerates it and compares. How stune reads SimpleTuner "
        "configs is described in [configuration](configuration.md#simpletuner-configs).",
        "",
        "Status of each name: **implemented** (stune's option of that name acts; the test named shows it), "
        "**plugin** (a first-party plugin implements it; without the plugin the check names the package to "
        "install), **differently** (accepted; stune does the job as described, and says so in an info line), "
        "**refused** (the check stops with the reason shown, unless the value is one that asks for nothing, "
        "listed under *accepted*).",
        "",
        "## Counts",
        "",
        f"- SimpleTuner 4.10.1 options for image flow-matching transformers: {len(options)} — "
        f"{n[IMPLEMENTED]} implemented ({n[IMPLEMENTED] - by_plugin} in the core, {by_plugin} by installed "
        f"plugins), {n[PLUGIN]} owned by plugins that are not installed, {n[DIFFERENTLY]} implemented "
        f"differently, {n[REFUSED]} refused" + (f", {n['missing']} without a status" if n["missing"] else "") + ".",
        f"- multidatabackend.json dataset keys: {len(keys)} — {k[IMPLEMENTED]} implemented, {k[DIFFERENTLY]} "
        f"implemented differently, {k[REFUSED]} refused"
        + (f", {k['missing']} without a status" if k["missing"] else "")
        + ". Dataset `type` values other than `local` (aws, csv, huggingface, webshart, memory) and "
        "`dataset_type` values stune does not train on (video, audio, image_embeds, …) are refused with "
        "their own reason.",
        "",
        "## Options",
        "",
        *_table(options),
        "",
        "## Dataset keys (multidatabackend.json)",
        "",
        *_table(keys),
    ]
    return "\n".join(lines) + "\n"


def _table(statuses: list[Status]) -> list[str]:
    rows = ["| SimpleTuner name | status | stune | how stune differs / why refused | test |", "|---|---|---|---|---|"]
    for s in statuses:
        status = s.status if s.status != IMPLEMENTED or s.owner in ("", "core") else f"implemented (`{s.owner}`)"
        if s.status == PLUGIN:
            status = f"plugin `{s.owner}`"
        reason = s.reason
        if s.status == REFUSED and s.accepted:
            reason += " Accepted: " + ", ".join(f"`{_shown(v)}`" for v in s.accepted) + "."
        stune = f"`{s.stune}`" if s.stune and " " not in s.stune else s.stune
        test = f"`{s.test}`" if s.test else ""
        rows.append(f"| `{s.name}` | {status} | {stune} | {reason.replace('|', '/')} | {test} |")
    return rows


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
