"""TREAD token routing (Krause et al. 2025): in training, a share of the image tokens skips a window
of transformer blocks and rejoins unchanged after it, which makes those blocks cheaper.

``tread_config`` is read as SimpleTuner reads it: ``{"routes": [{"selection_ratio": 0.5,
"start_layer_idx": 2, "end_layer_idx": -2}, …]}``, a JSON object or string. ``selection_ratio`` is
the share of image tokens **dropped**; layer indices count blocks across the family's block lists
in execution order (FLUX: 19 double then 38 single blocks), negative ones from the end, ends
inclusive. Routes must be sorted and must not overlap.

How it works, for any family that declares a token layout (the plugin names no family):

* at the start of every forward the router asks :func:`stune.step.in_training_forward`; outside a
  training forward with gradient (validation, eval loss, regularisation targets, rollouts) it does
  nothing at all;
* at the first block of each route it draws the kept image tokens once for the forward — one set
  shared by the batch (a batch is one bucket, and FLUX's rotary embedding has no batch dimension):
  tokens inside the loss mask are always kept (force-keep), padding tokens (HiDream's non-square
  inputs) are never candidates — they stay, since the model's padding mask only zeroes their keys
  and they still weigh in attention — and the rest are drawn with the feature's seeded generator,
  uniformly, or mixed with each token's L1 norm when ``importance`` > 0 (high-norm tokens are kept
  more often); the share dropped is a share of the real tokens;
* before every block of the window it gathers the kept tokens and the matching rows of the
  block's side inputs (rotary embedding, masks) with the family's layout; after the block it
  scatters them back, the dropped tokens keeping the values they had on entering the block. So a
  dropped token leaves the window as it entered it, and text tokens are never touched.

The kept set is drawn once per forward and reused when gradient checkpointing recomputes a block
in the backward pass.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from stune.errors import ConfigError
from stune.features import TrainingFeature
from stune.layout import BlockList, ForwardTokens, Selection, TokenLayout, token_grid_mask
from stune.options import Options
from stune.step import current_forward, in_training_forward

if TYPE_CHECKING:
    import torch


class Route(BaseModel):
    model_config = ConfigDict(extra="forbid")

    selection_ratio: float = Field(ge=0.0, lt=1.0, description="Share of image tokens dropped in the window.")
    start_layer_idx: int = Field(description="First block of the window (negative: from the end).")
    end_layer_idx: int = Field(description="Last block of the window, inclusive (negative: from the end).")
    importance: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="Weight of the L1-norm score against uniform noise (default tread_importance).",
    )


class TreadConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    routes: list[Route] = Field(min_length=1)


def _one_sentence(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg']}" if where else str(first["msg"])


class TreadOptions(Options):
    tread_config: dict[str, Any] | None = Field(
        None,
        description='TREAD routes: {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}]} '
        "(ratio = share of image tokens dropped; indices across all blocks, negative from the end, inclusive).",
    )
    tread_importance: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="0: the kept tokens are drawn uniformly; up to 1: mixed with each token's L1 norm, so "
        "high-norm tokens are kept more often (a route's own `importance` wins).",
    )

    @field_validator("tread_config", mode="before")
    @classmethod
    def _parse_tread_config(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value.strip() or value.strip().lower() in ("none", "null"):
                return None
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"it is not JSON ({exc.msg})") from None
        if value is None:
            return None
        try:
            TreadConfig.model_validate(value)
        except ValidationError as exc:
            raise ValueError(f"{_one_sentence(exc)} (see docs/tread.md)") from None
        return value

    @property
    def tread_routes(self) -> list[Route]:
        return TreadConfig.model_validate(self.tread_config or {"routes": []}).routes if self.tread_config else []


@dataclass(frozen=True)
class Window:
    """A route with its layer indices resolved against the model's depth."""

    start: int
    end: int
    ratio: float
    importance: float


def resolve_routes(routes: list[Route], depth: int, default_importance: float) -> list[Window]:
    """Normalise negative indices and check the windows; a problem is one ConfigError sentence."""
    windows = []
    for number, route in enumerate(routes, start=1):
        start = route.start_layer_idx + depth if route.start_layer_idx < 0 else route.start_layer_idx
        end = route.end_layer_idx + depth if route.end_layer_idx < 0 else route.end_layer_idx
        if not (0 <= start < depth and 0 <= end < depth):
            raise ConfigError(
                f"tread_config route {number} (layers {route.start_layer_idx}..{route.end_layer_idx}) reaches outside "
                f"the model's {depth} blocks (indices 0..{depth - 1}, or -{depth}..-1 from the end); fix its indices."
            )
        if start > end:
            raise ConfigError(
                f"tread_config route {number} starts at block {start} after it ends at block {end}; "
                "swap start_layer_idx and end_layer_idx."
            )
        importance = route.importance if route.importance is not None else default_importance
        windows.append(Window(start, end, route.selection_ratio, importance))
    for number, (before, after) in enumerate(itertools.pairwise(windows), start=2):
        if after.start <= before.end:
            raise ConfigError(
                f"tread_config route {number} (blocks {after.start}..{after.end}) overlaps or comes before the "
                f"route ahead of it (blocks {before.start}..{before.end}); list routes in order without overlap."
            )
    return windows


class Tread(TrainingFeature[TreadOptions]):
    name = "tread"
    description = "TREAD token routing: image tokens skip a window of blocks in training forwards."
    requires = ("token_layout",)

    def __init__(self, config: Any, family: Any) -> None:
        super().__init__(config, family)
        self.windows: list[Window] = []
        self.layout: TokenLayout | None = None
        # per forward
        self._active = False
        self._tokens: ForwardTokens | None = None
        self._forced: torch.Tensor | None = None
        self._kept: list[torch.Tensor | None] = []
        self._selection: Selection | None = None
        # per optimizer step, for the metrics
        self._kept_tokens = 0
        self._image_tokens = 0

    @classmethod
    def enabled(cls, config: Any) -> bool:
        return bool(getattr(config, "tread_config", None))

    def check(self) -> None:
        layout = self.family.token_layout()
        assert layout is not None  # `requires` was checked first
        try:
            depth = layout.depth_from_config(self.family.transformer_config())
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"tread_config's layer indices cannot be checked: the transformer's config.json could not be read "
                f"({str(exc).splitlines()[0]}); check pretrained_model_name_or_path."
            ) from None
        if depth is not None:
            self.windows = resolve_routes(self.options.tread_routes, depth, self.options.tread_importance)

    # -- installing ------------------------------------------------------------------------------------
    def install(self, transformer: torch.nn.Module, layout: TokenLayout) -> None:
        """Hook the transformer once: a forward pre-hook that decides whether this forward routes,
        and a pre/post hook pair on every block inside a window."""
        self.layout = layout
        self.windows = resolve_routes(
            self.options.tread_routes, layout.depth(transformer), self.options.tread_importance
        )
        transformer.register_forward_pre_hook(self._begin_forward)
        for index, blocks, module in layout.blocks(transformer):
            window = next((n for n, w in enumerate(self.windows) if w.start <= index <= w.end), None)
            if window is None:
                continue
            module.register_forward_pre_hook(partial(self._enter_block, blocks, window), with_kwargs=True)
            module.register_forward_hook(partial(self._leave_block, blocks))

    # -- one forward ---------------------------------------------------------------------------------
    def _begin_forward(self, module: Any, args: Any) -> None:
        context = current_forward()
        self._active = in_training_forward() and context is not None and context.tokens is not None
        self._kept = [None] * len(self.windows)
        self._selection = None
        if not self._active:
            return
        assert context is not None and context.tokens is not None and self.layout is not None
        self._tokens = context.tokens
        weight = context.inputs.loss_weight
        self._forced = None
        if weight is not None:  # masked loss: tokens inside the mask are always kept
            self._forced = token_grid_mask(weight, self.layout.patch_size, context.tokens).any(dim=0)

    def _enter_block(self, blocks: BlockList, window: int, module: Any, args: Any, kwargs: Any) -> Any:
        if not self._active or self._tokens is None:
            return None
        kept = self._kept[window]
        if kept is None:  # the window's first block in this forward: draw once
            kept = self._draw(blocks.routable_tokens(args, kwargs, self._tokens), self.windows[window])
            self._kept[window] = kept
        args, kwargs, self._selection = blocks.select(args, kwargs, kept, self._tokens)
        return args, kwargs

    def _leave_block(self, blocks: BlockList, module: Any, args: Any, output: Any) -> Any:
        if not self._active or self._selection is None:
            return None
        restored = blocks.restore(output, self._selection)
        self._selection = None
        return restored

    def _draw(self, routable: torch.Tensor, window: Window) -> torch.Tensor:
        """Indices (into the routable segment) of the tokens this window keeps, in random order."""
        import torch

        assert self._tokens is not None
        count, device = routable.shape[1], routable.device
        valid = self._tokens.valid
        valid = torch.ones(count, dtype=torch.bool, device=device) if valid is None else valid.to(device).bool()
        forced = self._forced.to(device) & valid if self._forced is not None else torch.zeros_like(valid)
        target = round(int(valid.sum()) * (1.0 - window.ratio))
        rest = max(0, target - int(forced.sum()))
        forced = forced | ~valid  # padding is kept whole, outside the share
        noise = torch.rand(count, generator=self.generator, device=self.generator.device).to(device)
        if window.importance > 0:
            score = routable.detach().float().abs().sum(dim=-1)  # (B, count) L1 norm per token
            low, high = score.min(dim=1, keepdim=True).values, score.max(dim=1, keepdim=True).values
            score = ((score - low) / (high - low).clamp_min(1e-12)).mean(dim=0)
            noise = (1.0 - window.importance) * noise + window.importance * score
        candidates = valid & ~forced
        noise = noise.masked_fill(~candidates, -1.0)  # never drawn: padding and the forced ones
        chosen = torch.topk(noise, k=min(rest, int(candidates.sum())), sorted=True).indices
        kept = torch.cat([forced.nonzero().flatten(), chosen])
        self._kept_tokens += int(kept.numel()) - int((~valid).sum())
        self._image_tokens += int(valid.sum())
        return kept

    def step_metrics(self) -> dict[str, float]:
        if not self._image_tokens:
            return {}
        metrics = {"tread/kept_fraction": self._kept_tokens / self._image_tokens}
        self._kept_tokens = self._image_tokens = 0
        return metrics
