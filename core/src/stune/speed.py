"""Speed options that change how the transformer computes, not what: compiled training
(``dynamo_*``), fused query/key/value projections, chunked feed-forward, TF32 and CPU threads.

Compilation is in place (``Module.compile``), so parameter names — and the saved adapter's keys —
do not change. With ``dynamo_use_regional_compilation`` each block of the family's token layout is
compiled on its own: the repeated blocks share one compiled graph, so compiling takes seconds
instead of minutes, and blocks that move between devices (block swap) are left eager.

Fused projections (diffusers' ``fuse_qkv_projections``) replace ``to_q``/``to_k``/``to_v`` (and
``add_q_proj``/…) by one ``to_qkv`` (``to_added_qkv``) layer; the LoRA is trained on it and saved
split back into the three layers' keys — exact, as the three share the LoRA's down projection —
so it loads into the unfused model everyone else uses.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from stune.errors import ConfigError

if TYPE_CHECKING:
    from stune.config import CoreOptions
    from stune.layout import TokenLayout

log = logging.getLogger("stune.speed")

#: fused layer → the layers it replaces, in the order their outputs are concatenated
FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


def set_process_options(config: CoreOptions) -> None:
    """TF32 for fp32 matmuls on CUDA (on unless disable_tf32, as SimpleTuner does) and CPU threads."""
    precision = "ieee" if config.disable_tf32 else "tf32"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision  # type: ignore[attr-defined]
    if config.torch_num_threads:
        torch.set_num_threads(config.torch_num_threads)


# -- fused projections --------------------------------------------------------------------------------


def fuse_projections(transformer: torch.nn.Module) -> int:
    """Fuse the attention projections and drop the unfused layers (they would only hold memory)."""
    if not hasattr(transformer, "fuse_qkv_projections"):
        raise ConfigError(f"fuse_qkv_projections: {type(transformer).__name__} cannot fuse its projections.")
    transformer.fuse_qkv_projections()  # type: ignore[operator]
    fused = 0
    for module in transformer.modules():
        if not getattr(module, "fused_projections", False):
            continue
        for name, parts in FUSED.items():
            if hasattr(module, name):
                fused += 1
                for part in parts:
                    if hasattr(module, part):
                        delattr(module, part)
    if not fused:
        raise ConfigError(
            f"fuse_qkv_projections: {type(transformer).__name__} has no attention layer diffusers can fuse; "
            "turn the option off."
        )
    log.info("fused %d query/key/value projections", fused)
    return fused


def fused_targets(targets: Iterable[str]) -> list[str]:
    """LoRA target names after fusing: any of q/k/v becomes the fused layer."""
    out: list[str] = []
    for target in targets:
        name = next((fused for fused, parts in FUSED.items() if target in parts), target)
        if name not in out:
            out.append(name)
    return out


def split_fused_lora(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA of fused layers as the LoRA of the unfused ones: the down projection (``lora_A``) is
    shared, the up projection (``lora_B``) is cut into the three outputs."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        prefix, fused, rest = _split_key(key)
        if fused is None:
            out[key] = value
            continue
        parts = FUSED[fused]
        pieces = value.chunk(len(parts), dim=0) if rest.startswith("lora_B") else [value] * len(parts)
        for part, piece in zip(parts, pieces, strict=True):
            out[f"{prefix}{part}.{rest}"] = piece.clone()  # own storage: safetensors refuses shared tensors
    return out


def merge_fused_lora(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reverse of :func:`split_fused_lora` (resume, init_lora); a LoRA whose three down projections
    differ was not trained fused and cannot become one."""
    out = dict(state_dict)
    for key in list(state_dict):
        for fused, parts in FUSED.items():
            marker = f".{parts[0]}."
            if marker not in f".{key}" or key not in out:
                continue
            head, _, rest = f".{key}".partition(marker)
            prefix = head[1:] + "." if head[1:] else ""
            keys = [f"{prefix}{part}.{rest}" for part in parts]
            if not all(k in out for k in keys):
                continue
            values = [out.pop(k) for k in keys]
            if rest.startswith("lora_B"):
                merged = torch.cat(values, dim=0)
            else:
                if not all(torch.equal(values[0], v) for v in values[1:]):
                    raise ConfigError(
                        f"The LoRA's {', '.join(parts)} layers were not trained with fuse_qkv_projections (their "
                        "down projections differ); train without fuse_qkv_projections to start from it."
                    )
                merged = values[0]
            out[f"{prefix}{fused}.{rest}"] = merged
    return out


def _split_key(key: str) -> tuple[str, str | None, str]:
    for fused in FUSED:
        marker = f".{fused}."
        if marker in f".{key}":
            head, _, rest = f".{key}".partition(marker)
            return (head[1:] + "." if head[1:] else ""), fused, rest
    return "", None, key


def fused_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The LoRA config of the unfused layers (what the split state dict matches)."""
    targets = metadata.get("target_modules")
    if not isinstance(targets, list | tuple | set):
        return metadata
    unfused: list[str] = []
    for target in targets:
        for part in FUSED.get(target, (target,)):
            if part not in unfused:
                unfused.append(part)
    return {**metadata, "target_modules": sorted(unfused)}


# -- chunked feed-forward ------------------------------------------------------------------------------


def chunk_feed_forward(transformer: torch.nn.Module, chunk_size: int) -> int:
    """Every diffusers ``FeedForward`` runs on ``chunk_size`` tokens at a time (same result, the
    4×-wide hidden activation exists for one chunk at a time). The layers become instances of a
    subclass, so their parameter names do not change."""
    from diffusers.models.attention import FeedForward

    chunked: dict[type, type] = {}
    count = 0
    for module in transformer.modules():
        if not isinstance(module, FeedForward):
            continue
        base = type(module)
        if base not in chunked:
            chunked[base] = type(f"Chunked{base.__name__}", (_ChunkedForward, base), {})
        module.__class__ = chunked[base]
        module.feed_forward_chunk_size = chunk_size  # type: ignore[assignment]
        count += 1
    if not count:
        raise ConfigError(
            f"enable_chunked_feed_forward: {type(transformer).__name__} has no diffusers FeedForward layer to chunk; "
            "turn the option off."
        )
    log.info("feed-forward in chunks of %d tokens (%d layers)", chunk_size, count)
    return count


class _ChunkedForward(torch.nn.Module):
    feed_forward_chunk_size: int

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        forward = super().forward
        chunks = torch.split(hidden_states, self.feed_forward_chunk_size, dim=-2)
        if len(chunks) == 1:
            return forward(hidden_states, *args, **kwargs)  # type: ignore[no-any-return]
        return torch.cat([forward(chunk, *args, **kwargs) for chunk in chunks], dim=-2)


# -- compiled training ------------------------------------------------------------------------------------


def compile_transformer(
    transformer: torch.nn.Module,
    layout: TokenLayout | None,
    config: CoreOptions,
    skip: Iterable[torch.nn.Module] = (),
) -> int:
    """Compile the transformer in place for training; returns the number of compiled modules."""
    options: dict[str, Any] = {
        "backend": config.dynamo_backend,
        "fullgraph": config.dynamo_fullgraph,
        "dynamic": config.dynamo_dynamic,
    }
    if config.dynamo_mode != "default":
        options["mode"] = config.dynamo_mode
    if not config.dynamo_use_regional_compilation:
        transformer.compile(**options)
        log.info("compiled the transformer (%s)", config.dynamo_backend)
        return 1
    if layout is None:
        raise ConfigError(
            "dynamo_use_regional_compilation needs the family to declare its blocks (a token layout); "
            "set it to false to compile the whole transformer."
        )
    left = {id(module) for module in skip}
    count = 0
    for _, _, block in layout.blocks(transformer):
        if id(block) not in left:
            block.compile(**options)
            count += 1
    log.info("compiled %d transformer blocks (%s)", count, config.dynamo_backend)
    return count


def check_speed(config: CoreOptions) -> None:
    if config.fuse_qkv_projections:
        if config.model_type != "lora" or config.lora_type != "standard" or config.use_dora:
            raise ConfigError(
                "fuse_qkv_projections trains a PEFT LoRA on the fused layers and saves it unfused; it does not "
                "support full fine-tuning, LyCORIS or DoRA — turn it off for those."
            )
        precision = getattr(config, "base_model_precision", "no_change")
        if precision not in ("no_change", None):
            raise ConfigError(
                f"fuse_qkv_projections concatenates the base weights, which base_model_precision={precision} "
                "has quantized; quantize without fusing, or fuse without quantizing."
            )
    if config.dynamo_backend != "no":
        import shutil

        if config.dynamo_backend == "inductor" and not torch.cuda.is_available() and shutil.which("g++") is None:
            raise ConfigError(
                "dynamo_backend=inductor compiles C++ for the CPU and needs a C++ compiler (g++); install one "
                "or use dynamo_backend=no."
            )
        if config.dynamo_backend == "cudagraphs" and not torch.cuda.is_available():
            raise ConfigError("dynamo_backend=cudagraphs needs a CUDA GPU, which this machine lacks.")
