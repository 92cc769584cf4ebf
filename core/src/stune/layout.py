"""The token layout a family declares, so that a router can drop tokens without knowing the family.

A diffusion transformer runs its tokens through one or more lists of blocks. What a router needs
to know about each list is data, declared by the family in :meth:`ModelFamily.token_layout`:

* which argument of a block carries the token sequence, and which **segments** it is made of, in
  order (FLUX single blocks take image tokens only and the text separately; HiDream's single-stream
  blocks take ``[image; text]``; FLUX Kontext's take ``[image; reference]``), each marked routable
  or not — only image tokens are ever routed;
* where the tokens sit in the block's return value;
* the **side inputs** aligned with tokens that must be subset together with them: rotary
  embeddings (FLUX's cover ``[text; image]`` without a batch dimension, HiDream's ``[image; text]``
  with one), padding masks, attention masks inside a keyword dict.

Per forward pass the family also says how many tokens each segment has (:class:`ForwardTokens`,
from :meth:`ModelFamily.forward_tokens`); the core publishes it while the transformer runs
(:func:`stune.step.current_forward`).

:meth:`BlockList.select` and :meth:`BlockList.restore` are the mechanics: gather the kept tokens
(and the matching rows of every side input) before a block, scatter the block's output back into
the full sequence after it, the dropped tokens keeping the values they entered the block with.

This module does not import torch at import time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stune.errors import ConfigError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Segment:
    """A run of tokens in a sequence: ``image``, ``text``, ``reference``, … Only routable ones are dropped."""

    name: str
    routable: bool = False


@dataclass(frozen=True)
class Arg:
    """A block argument, by keyword ``name`` or, when passed positionally (gradient checkpointing
    calls blocks with positional arguments), by ``position``."""

    name: str
    position: int

    def get(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.name in kwargs:
            return kwargs[self.name]
        return args[self.position] if self.position < len(args) else None

    def put(self, args: tuple[Any, ...], kwargs: dict[str, Any], value: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if self.name in kwargs or self.position >= len(args):
            return args, {**kwargs, self.name: value}
        return (*args[: self.position], value, *args[self.position + 1 :]), kwargs


@dataclass(frozen=True)
class SideInput:
    """A block input aligned with tokens along ``token_dim`` (a tensor, or a tuple of tensors such as
    FLUX's rotary ``(cos, sin)``), covering ``segments`` in this order. ``key``: the input is an item
    of a dict argument (an attention mask inside ``joint_attention_kwargs``)."""

    arg: Arg
    segments: tuple[str, ...]
    token_dim: int
    key: str | None = None


@dataclass(frozen=True)
class ForwardTokens:
    """How many tokens each segment has in one forward pass (per sample; a batch shares one bucket).

    ``grid``: rows and columns of the image-token grid (row-major, ``counts["image"]`` may be larger
    when the family pads); ``valid``: which image tokens are real, where the family pads (a bool
    tensor of ``counts["image"]``), else None. A segment left out of ``counts`` is whatever remains.
    """

    counts: dict[str, int]
    grid: tuple[int, int]
    valid: torch.Tensor | None = None


@dataclass(frozen=True)
class BlockList:
    """One list of blocks of the transformer and how its blocks take tokens."""

    attribute: str
    tokens: Arg
    segments: tuple[Segment, ...]
    #: index of the tokens in the block's returned tuple; None when the block returns them alone
    output: int | None = None
    side_inputs: tuple[SideInput, ...] = ()
    #: the transformer config key holding how many blocks the list has (to check layer indices
    #: before any weight is loaded)
    count_key: str | None = None

    @property
    def routable(self) -> Segment:
        return next(s for s in self.segments if s.routable)

    def routable_tokens(self, args: tuple[Any, ...], kwargs: dict[str, Any], tokens: ForwardTokens) -> torch.Tensor:
        """The routable segment of the block's token input, (B, count, D)."""
        full: torch.Tensor = self.tokens.get(args, kwargs)
        offset, count = segment_spans([s.name for s in self.segments], full.shape[1], tokens)[self.routable.name]
        return full[:, offset : offset + count]

    def select(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], keep: torch.Tensor, tokens: ForwardTokens
    ) -> tuple[tuple[Any, ...], dict[str, Any], Selection]:
        """The block's arguments with only the kept routable tokens (``keep``: indices into the
        routable segment, shared by the batch) and every side input subset to match."""
        full = self.tokens.get(args, kwargs)
        positions = _positions([s.name for s in self.segments], full.shape[1], self.routable.name, keep, tokens)
        args, kwargs = self.tokens.put(args, kwargs, full.index_select(1, positions))
        for side in self.side_inputs:
            value = side.arg.get(args, kwargs)
            item = value.get(side.key) if side.key is not None and isinstance(value, dict) else value
            if item is None:
                continue
            length = (item[0] if isinstance(item, tuple) else item).shape[side.token_dim]
            rows = _positions(list(side.segments), length, self.routable.name, keep, tokens)
            if isinstance(item, tuple):
                subset: Any = tuple(t.index_select(side.token_dim, rows) for t in item)
            else:
                subset = item.index_select(side.token_dim, rows)
            if side.key is not None:
                subset = {**value, side.key: subset}
            args, kwargs = side.arg.put(args, kwargs, subset)
        return args, kwargs, Selection(full, positions)

    def restore(self, output: Any, selection: Selection) -> Any:
        """The block's output over the full sequence: kept positions from the block, dropped ones as
        they entered it."""
        routed = output if self.output is None else output[self.output]
        full = selection.full.index_copy(1, selection.positions, routed.to(selection.full.dtype))
        if self.output is None:
            return full
        return (*output[: self.output], full, *output[self.output + 1 :])


@dataclass(frozen=True)
class Selection:
    """What :meth:`BlockList.restore` needs: the block's full input tokens and the kept positions."""

    full: torch.Tensor
    positions: torch.Tensor


@dataclass(frozen=True)
class TokenLayout:
    """The block lists of a transformer, in the order they run.

    Layer indices (as ``tread_config`` routes count them) run across the lists in this order.
    ``patch_size``: latent pixels per image-token side (loss masks map onto tokens with it).
    """

    block_lists: tuple[BlockList, ...]
    patch_size: int

    def __post_init__(self) -> None:
        for blocks in self.block_lists:
            routable = [s for s in blocks.segments if s.routable]
            if len(routable) != 1:
                raise ValueError(f"block list {blocks.attribute} must have exactly one routable segment")

    def blocks(self, transformer: torch.nn.Module) -> Iterator[tuple[int, BlockList, torch.nn.Module]]:
        """(global layer index, its list, the block module) for every block, in execution order."""
        index = 0
        for blocks in self.block_lists:
            modules = getattr(transformer, blocks.attribute, None)
            if modules is None:
                raise ConfigError(
                    f"The token layout names the block list `{blocks.attribute}`, which this transformer "
                    f"({type(transformer).__name__}) does not have."
                )
            for module in modules:
                yield index, blocks, module
                index += 1

    def depth(self, transformer: torch.nn.Module) -> int:
        return sum(len(getattr(transformer, b.attribute)) for b in self.block_lists)

    def depth_from_config(self, config: dict[str, Any]) -> int | None:
        """The number of blocks from the transformer's config.json, if every list names its key."""
        if any(b.count_key is None or not isinstance(config.get(b.count_key), int) for b in self.block_lists):
            return None
        return sum(int(config[b.count_key]) for b in self.block_lists if b.count_key is not None)


def segment_spans(names: list[str], length: int, tokens: ForwardTokens) -> dict[str, tuple[int, int]]:
    """(offset, count) of each of ``names`` in a sequence of ``length`` tokens made of them in order."""
    known = {n: tokens.counts[n] for n in names if n in tokens.counts}
    unknown = [n for n in names if n not in known]
    if len(unknown) > 1:
        raise ValueError(f"segments {unknown} have no token count; a family announces all but one")
    if unknown:
        known[unknown[0]] = length - sum(known.values())
    if sum(known.values()) != length:
        raise ValueError(f"segment counts {known} do not add up to the sequence length {length}")
    spans, offset = {}, 0
    for name in names:
        spans[name] = (offset, known[name])
        offset += known[name]
    return spans


def _positions(names: list[str], length: int, routable: str, keep: torch.Tensor, tokens: ForwardTokens) -> torch.Tensor:
    """Sequence positions of the kept tokens in a sequence of ``length`` made of ``names`` segments."""
    import torch

    parts = []
    for name, (offset, count) in segment_spans(names, length, tokens).items():
        if name == routable:
            parts.append(keep.to(torch.long) + offset)
        else:
            parts.append(torch.arange(offset, offset + count, device=keep.device))
    return torch.cat(parts)


def token_grid_mask(mask: torch.Tensor, patch_size: int, tokens: ForwardTokens) -> torch.Tensor:
    """A latent-grid mask (B, 1, h, w) as one flag per image token (B, counts["image"]): a token is
    set when its patch's mean is above one half (padding tokens are never set)."""
    import torch.nn.functional as F

    pooled = F.avg_pool2d(mask.float(), patch_size).flatten(1) > 0.5  # (B, rows * cols), row-major
    count = tokens.counts["image"]
    if pooled.shape[1] == count:
        return pooled
    padded = pooled.new_zeros((pooled.shape[0], count))
    padded[:, : pooled.shape[1]] = pooled
    return padded
