"""What is trained, behind one small interface: a PEFT LoRA, a LyCORIS network, or the whole transformer.

Every adapter knows its trainable parameters, how to switch itself off (the base model's prediction
for regularisation data), how to write itself in the format people load elsewhere, and how to read
that back for resume. The training loop only talks to this interface.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from stune.errors import ConfigError
from stune.family import match_modules

if TYPE_CHECKING:
    from stune.config import CoreOptions
    from stune.family import ModelFamily

log = logging.getLogger("stune.adapters")
LORA_FILE = "pytorch_lora_weights.safetensors"
#: the safetensors metadata entry diffusers keeps the LoraConfig in
LORA_METADATA_KEY = "lora_adapter_metadata"
LYCORIS_CONFIG_FILE = "lycoris_config.json"
FULL_FOLDER = "transformer"


class Adapter:
    """The trained part of a run."""

    kind: ClassVar[str]
    #: whether the adapter can be switched off to get the base model's prediction
    can_disable: ClassVar[bool] = True
    #: the transformer's weights gathered whole (sharded runs): what :meth:`save` writes from
    gathered: dict[str, torch.Tensor] | None = None

    def __init__(self, transformer: torch.nn.Module, family: ModelFamily, config: CoreOptions) -> None:
        self.transformer = transformer
        self.family = family
        self.config = config

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.transformer.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Inside the block the model predicts like the base model."""
        raise NotImplementedError
        yield  # pragma: no cover

    def save(self, output_dir: Path) -> list[Path]:
        """Write the trained weights in their loadable format into ``output_dir``."""
        raise NotImplementedError

    def load(self, folder: Path) -> None:
        """Read back what :meth:`save` wrote (resume, ``init_lora``)."""
        raise NotImplementedError

    def resume_state(self) -> dict[str, torch.Tensor]:
        """Trained tensors the loadable format does not hold as they are; checkpoints keep them
        beside it so a resumed run continues exactly. Default: none."""
        return {}

    def load_resume_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put back what :meth:`resume_state` gave (after :meth:`load`)."""

    def _cast_trainable(self, dtype: torch.dtype) -> None:
        for param in self.parameters():
            param.data = param.data.to(dtype)


# -- PEFT LoRA ------------------------------------------------------------------------------------


class PeftLora(Adapter):
    kind = "lora"

    def __init__(self, transformer: torch.nn.Module, family: ModelFamily, config: CoreOptions) -> None:
        super().__init__(transformer, family, config)
        from peft import LoraConfig

        targets = family.lora_target_modules()
        if config.fuse_qkv_projections:
            from stune.speed import fused_targets

            targets = fused_targets(targets)
        names = [name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)]
        if not match_modules(names, targets):
            raise ConfigError(
                f"The LoRA targets {targets} match no linear layer of this {family.name} transformer; "
                "choose another target preset or fix peft_lora_target_modules."
            )
        settings: dict[str, Any] = {
            "r": config.lora_rank,
            "lora_alpha": config.effective_lora_alpha,  # a float is fine; PEFT only annotates int
            "lora_dropout": config.lora_dropout,
            "init_lora_weights": True if config.lora_init_type == "default" else config.lora_init_type,
            "use_dora": config.use_dora,
            "target_modules": targets,
        }
        if config.lora_init_type == "loftq":
            from peft import LoftQConfig

            settings["loftq_config"] = LoftQConfig(loftq_bits=4)
        transformer.requires_grad_(False)
        transformer.add_adapter(LoraConfig(**settings))  # type: ignore[operator]

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        self.transformer.disable_adapters()  # type: ignore[operator]
        try:
            yield
        finally:
            self.transformer.enable_adapters()  # type: ignore[operator]

    def save(self, output_dir: Path) -> list[Path]:
        from peft.utils import get_peft_model_state_dict

        state_dict = get_peft_model_state_dict(self.transformer, state_dict=self.gathered)
        peft_config: Any = self.transformer.peft_config
        config = peft_config["default"].to_dict()
        # PEFT keeps target_modules as a set; metadata must be JSON (diffusers writes it as a list too).
        metadata = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
        if self.config.fuse_qkv_projections:  # saved as the unfused layers' LoRA, which loads everywhere
            from stune.speed import fused_metadata, split_fused_lora

            state_dict, metadata = split_fused_lora(state_dict), fused_metadata(metadata)
        # Dropout is for training only: diffusers builds the loaded LoRA layers in training mode, so a
        # recorded lora_dropout would drop activations at inference unless the user calls .eval().
        metadata = {**metadata, "lora_dropout": 0.0}
        if self.config.lora_format == "comfyui":
            return [save_comfyui_lora(output_dir / LORA_FILE, state_dict, metadata, self.family)]
        # ComfyUI and other non-diffusers loaders ignore an alpha kept in the metadata: with the scale
        # folded into lora_B (alpha recorded = rank) every loader applies the trained strength.
        state_dict, metadata = fold_alpha(state_dict, metadata)
        return [self.family.save_lora(output_dir, state_dict, metadata)]

    def load(self, folder: Path) -> None:
        from peft import set_peft_model_state_dict

        path = folder / LORA_FILE if folder.is_dir() else folder
        if is_comfyui_lora(path):
            state_dict, file_alpha = read_comfyui_lora(path, self.transformer, self.family)
        else:
            state_dict, file_alpha = self.family.load_lora(path), _file_lora_alpha(path)
        if file_alpha is not None and file_alpha != self.config.effective_lora_alpha:
            # The file's scale (alpha / rank) moves into lora_B for this run's alpha: the same model.
            ratio = file_alpha / self.config.effective_lora_alpha
            state_dict = {k: (v.double() * ratio).to(v.dtype) if ".lora_B." in k else v for k, v in state_dict.items()}
        if self.config.fuse_qkv_projections:
            from stune.speed import merge_fused_lora

            state_dict = merge_fused_lora(state_dict)
        with tensors_fit(path, "adapter", "the LoRA options it was trained with (lora_rank, lora_target)"):
            result = set_peft_model_state_dict(self.transformer, state_dict)
        unexpected = getattr(result, "unexpected_keys", None) or []
        missing = [k for k in (getattr(result, "missing_keys", None) or []) if "lora_" in k]
        if unexpected or missing:
            key = (unexpected or missing)[0]
            raise ConfigError(
                f"The adapter {path} does not fit this LoRA ({len(unexpected)} unexpected and {len(missing)} "
                f"missing keys, e.g. {key}); use the same LoRA options it was trained with, or start fresh."
            )

    def resume_state(self) -> dict[str, torch.Tensor]:
        # The exported lora_B holds the alpha/rank scale folded in (rounded unless it is a power of
        # two): checkpoints keep the trained lora_B as it is, so a resumed run continues exactly.
        if self.config.lora_format == "comfyui" or self.config.effective_lora_alpha == self.config.lora_rank:
            return {}
        return {
            name: p.detach().cpu().contiguous() for name, p in self.transformer.named_parameters() if ".lora_B." in name
        }

    def load_resume_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, param in self.transformer.named_parameters():
                if name in state:
                    param.copy_(state[name])


def fold_alpha(state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The LoRA with its scale (lora_alpha / r) multiplied into lora_B and lora_alpha = r: the same
    model for diffusers (which reads the alpha from the metadata) and for loaders that ignore it."""
    rank, alpha = metadata.get("r"), metadata.get("lora_alpha")
    if not rank or not alpha or alpha == rank or metadata.get("use_rslora"):
        return state_dict, metadata
    scale = float(alpha) / float(rank)
    folded = {k: (v.double() * scale).to(v.dtype) if ".lora_B." in k else v for k, v in state_dict.items()}
    return folded, {**metadata, "lora_alpha": rank}


def _file_lora_alpha(path: Path) -> float | None:
    """``lora_alpha`` in a diffusers LoRA file's metadata (None when it has none)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        text = (handle.metadata() or {}).get(LORA_METADATA_KEY)
    if not text:
        return None
    values = json.loads(text)
    alpha = values.get("transformer.lora_alpha", values.get("lora_alpha"))
    return float(alpha) if alpha is not None else None


def is_comfyui_lora(path: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return any(k.endswith(".lora_down.weight") for k in handle.keys())  # noqa: SIM118 (not iterable)


def save_comfyui_lora(
    path: Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any], family: ModelFamily
) -> Path:
    """The LoRA in the kohya layout ComfyUI reads: ``<key>.lora_down.weight`` (lora_A),
    ``<key>.lora_up.weight`` (lora_B) and the scalar ``<key>.alpha`` per module, ``<key>`` being
    :meth:`ModelFamily.comfyui_lora_key` of the module. ComfyUI scales each module by alpha / rank."""
    from safetensors.torch import save_file

    alpha = float(metadata["lora_alpha"])
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        module, sep, part = name.partition(".lora_")
        if not sep or part not in ("A.weight", "B.weight"):
            raise ConfigError(
                f"lora_format comfyui cannot store `{name}` (only lora_A / lora_B weights: no DoRA, no LoRA bias); "
                "use lora_format diffusers."
            )
        key = family.comfyui_lora_key(module)
        out[f"{key}.lora_{'down' if part == 'A.weight' else 'up'}.weight"] = tensor.contiguous()
        out[f"{key}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The PEFT config stays in the metadata, where diffusers' loader reads the alpha of this layout.
    save_file(
        out,
        str(path),
        metadata={"format": "pt", LORA_METADATA_KEY: json.dumps({f"transformer.{k}": v for k, v in metadata.items()})},
    )
    return path


def read_comfyui_lora(
    path: Path, transformer: torch.nn.Module, family: ModelFamily
) -> tuple[dict[str, torch.Tensor], float | None]:
    """A ComfyUI-layout file back as a PEFT state dict of ``transformer`` and its alpha."""
    from safetensors.torch import load_file

    weights = load_file(str(path))
    modules = {family.comfyui_lora_key(name): name for name, _ in transformer.named_modules() if name}
    # With fuse_qkv_projections the file names the unfused layers (to_q, …) this transformer lacks.
    prefix = family.comfyui_lora_key("")
    for key in weights:
        stem = key.rpartition(".lora_")[0] or key.removesuffix(".alpha")
        if stem not in modules and prefix and stem.startswith(prefix):
            modules[stem] = stem[len(prefix) :]
    state_dict: dict[str, torch.Tensor] = {}
    alphas = set()
    for key, tensor in weights.items():
        stem, _, part = key.rpartition(".lora_")
        if part in ("down.weight", "up.weight") and stem in modules:
            state_dict[f"{modules[stem]}.lora_{'A' if part == 'down.weight' else 'B'}.weight"] = tensor
        elif key.endswith(".alpha") and key[: -len(".alpha")] in modules:
            alphas.add(float(tensor.item()))
        else:
            raise ConfigError(f"The ComfyUI LoRA {path} has the key `{key}`, which fits no module of this transformer.")
    if len(alphas) > 1:
        raise ConfigError(
            f"The ComfyUI LoRA {path} has different alphas per module ({sorted(alphas)}); stune uses one."
        )
    return state_dict, (alphas.pop() if alphas else None)


# -- LyCORIS --------------------------------------------------------------------------------------------


class Lycoris(Adapter):
    kind = "lycoris"
    #: the keys ``lycoris.LycorisNetwork.apply_preset`` accepts, with the library's own defaults
    _PRESET_DEFAULTS: ClassVar[dict[str, Any]] = {}

    def __init__(self, transformer: torch.nn.Module, family: ModelFamily, config: CoreOptions) -> None:
        super().__init__(transformer, family, config)
        from lycoris import LycorisNetwork, create_lycoris

        from stune.checks import lycoris_settings

        path = Path(config.lycoris_config)
        settings = lycoris_settings(config.lycoris_config)  # an unknown algo is a sentence, not lycoris's KeyError
        self.settings = settings
        kwargs = dict(settings)
        multiplier = float(kwargs.pop("multiplier", 1.0))
        linear_dim = int(kwargs.pop("linear_dim", 4))
        linear_alpha = float(kwargs.pop("linear_alpha", 1.0))
        preset = kwargs.pop("apply_preset", None) or {"target_module": ["Attention"]}
        _apply_preset(LycorisNetwork, _alias_layer_classes(_alias_preset(preset, family), transformer))
        if _has_quantized_linear(transformer):
            # A quantized weight cannot be merged with the LyCORIS delta on every forward (torchao's
            # tensors have no `+`): run the base layer as is and add the adapter's output.
            if str(kwargs.get("bypass_mode", True)).lower() in ("false", "0"):
                raise ConfigError(
                    f"The LyCORIS config {path} sets bypass_mode false, which cannot train on a quantized base; "
                    "remove bypass_mode (it is turned on for quantized layers)."
                )
            kwargs["bypass_mode"] = True
        transformer.requires_grad_(False)
        network = create_lycoris(transformer, multiplier, linear_dim, linear_alpha, **kwargs)
        if not network.loras:
            raise ConfigError(
                f"The LyCORIS config {path} matches no module of this {family.name} transformer; check its "
                f"target_module / name_algo_map (module classes here include: {_class_names(transformer)})."
            )
        network.apply_to()
        if config.init_lokr_norm is not None:
            _init_lokr_norm(network, config.init_lokr_norm)
        # Attached as a submodule so that .to(), accelerate and DDP see its parameters.
        transformer.add_module("stune_lycoris", network)
        self.network = network
        kinds = Counter(type(m).__name__ for m in network.loras)
        log.info("LyCORIS %s: %d modules (%s)", settings["algo"], len(network.loras), dict(kinds))

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.network.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        multiplier = self.network.multiplier
        self.network.set_multiplier(0.0)
        try:
            yield
        finally:
            self.network.set_multiplier(multiplier)

    def save(self, output_dir: Path) -> list[Path]:
        output_dir.mkdir(parents=True, exist_ok=True)
        weights = output_dir / LORA_FILE
        self.network.save_weights(str(weights), None, {"lycoris_config": json.dumps(self.settings)})
        config = output_dir / LYCORIS_CONFIG_FILE
        config.write_text(json.dumps(self.settings, indent=2))
        return [weights, config]

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        path = folder / LORA_FILE if folder.is_dir() else folder
        weights = load_file(str(path))
        with tensors_fit(path, "LyCORIS weights", "the lycoris_config they were trained with"):
            missing, unexpected = self.network.load_state_dict(weights, strict=False)
        if unexpected or missing:
            key = (unexpected or missing)[0]
            raise ConfigError(
                f"The LyCORIS weights {path} do not fit this network ({len(unexpected)} unexpected and "
                f"{len(missing)} missing keys, e.g. {key}); use the lycoris_config they were trained with."
            )

    def resume_state(self) -> dict[str, torch.Tensor]:
        # lycoris's format folds LoKr's use_scalar into w1 (w1·scalar, scalar reset to 1 on load):
        # the same model, but other parameters than the optimizer's state belongs to.
        return {name: p.detach().cpu().contiguous() for name, p in self.network.named_parameters()}

    def load_resume_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, param in self.network.named_parameters():
                if name in state:
                    param.copy_(state[name])


@contextlib.contextmanager
def tensors_fit(path: Path, what: str, fix: str) -> Iterator[None]:
    """torch's "size mismatch" (a file trained with another rank, LyCORIS factor or model) as one
    sentence naming the file, the first tensor that differs and the options to use."""
    try:
        yield
    except RuntimeError as exc:
        text = str(exc)
        if "size mismatch" not in text:
            raise
        first = next(line.strip() for line in text.splitlines() if "size mismatch" in line)
        raise ConfigError(
            f"The {what} {path} holds tensors of other shapes than this run builds ({first[:240]}); resume with "
            f"{fix}, or start fresh."
        ) from None


def _lycoris_defaults(network_class: Any) -> dict[str, Any]:
    if not Lycoris._PRESET_DEFAULTS:
        Lycoris._PRESET_DEFAULTS.update(
            {
                "enable_conv": network_class.ENABLE_CONV,
                "target_module": list(network_class.TARGET_REPLACE_MODULE),
                "target_name": list(network_class.TARGET_REPLACE_NAME),
                "module_algo_map": dict(network_class.MODULE_ALGO_MAP),
                "name_algo_map": dict(network_class.NAME_ALGO_MAP),
                "use_fnmatch": network_class.USE_FNMATCH,
                "exclude_name": list(network_class.TARGET_EXCLUDE_NAME),
            }
        )
    return dict(Lycoris._PRESET_DEFAULTS)


def _apply_preset(network_class: Any, preset: dict[str, Any]) -> None:
    # lycoris keeps the preset in class attributes; start from its defaults every time so that a
    # second run in the same process does not inherit the first one's targets.
    defaults = _lycoris_defaults(network_class)
    unknown = sorted(set(preset) - set(defaults) - {"lora_prefix"})
    if unknown:
        raise ConfigError(f"`apply_preset` in the LyCORIS config has an unknown key `{unknown[0]}`.")
    if "target_module" not in preset and (preset.get("name_algo_map") or preset.get("target_name")):
        # A preset that picks modules by name means those modules only: lycoris's default target
        # classes (every Linear, Conv and Norm) would adapt the whole model besides them.
        preset = {**preset, "target_module": []}
    network_class.apply_preset({**defaults, **preset})


def _alias_preset(preset: dict[str, Any], family: ModelFamily) -> dict[str, Any]:
    """Module class names in SimpleTuner configs (``Attention``) → this family's diffusers classes."""
    aliases = family.lycoris_module_aliases
    if not aliases:
        return preset
    out = dict(preset)
    if "target_module" in out:
        out["target_module"] = [name for n in out["target_module"] for name in (n, *aliases.get(n, ()))]
    if "module_algo_map" in out:
        mapped: dict[str, Any] = {}
        for name, algo in out["module_algo_map"].items():
            for alias in (name, *aliases.get(name, ())):
                mapped[alias] = algo
        out["module_algo_map"] = mapped
    return out


def _alias_layer_classes(preset: dict[str, Any], transformer: torch.nn.Module) -> dict[str, Any]:
    """A torch layer class a preset names (``Linear``) also matches its subclasses in this model:
    the quantized layers a quantization backend swapped in (quanto's ``QLinear``, bitsandbytes'
    ``LinearNF4``), which LyCORIS matches by class name only."""
    layers: dict[str, set[str]] = {}
    for module in transformer.modules():
        for base in type(module).__mro__[1:]:
            if base.__module__.startswith("torch.nn.modules") and base is not torch.nn.Module:
                layers.setdefault(base.__name__, set()).add(type(module).__name__)
    out = dict(preset)
    if "target_module" in out:
        out["target_module"] = [a for n in out["target_module"] for a in (n, *sorted(layers.get(n, ())))]
    if "module_algo_map" in out:
        out["module_algo_map"] = {
            alias: algo
            for name, algo in out["module_algo_map"].items()
            for alias in (name, *sorted(layers.get(name, ())))
        }
    return out


def _has_quantized_linear(transformer: torch.nn.Module) -> bool:
    """Whether a Linear layer holds quantized weights (a tensor subclass or a quantized layer class)."""
    for module in transformer.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and weight is not None and type(weight) is not torch.nn.Parameter:
            return True
    return False


def _class_names(module: torch.nn.Module) -> str:
    names = sorted({type(m).__name__ for m in module.modules() if type(m).__module__.startswith("diffusers")})
    return ", ".join(names[:12])


def _init_lokr_norm(network: Any, scale: float) -> None:
    """SimpleTuner's init_lokr_norm: w1 = 1, w2 ~ N(0, (scale · std of the original weight)²)."""
    with torch.no_grad():
        for module in network.loras:
            if not hasattr(module, "lokr_w1") or not hasattr(module, "lokr_w2"):
                continue
            module.lokr_w1.fill_(1.0)
            original = _dense_weight(module.org_module[0] if isinstance(module.org_module, list) else module.org_module)
            module.lokr_w2.normal_(0.0, float(original.float().std()) * scale)
            if getattr(module, "scalar", None) is not None and module.scalar.numel() == 1:
                module.scalar.fill_(1.0)  # use_scalar starts at 0, which would hide the initialisation


def _dense_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The layer's weight as a plain tensor, dequantized if a quantization backend packed it."""
    from peft.utils.integrations import dequantize_module_weight

    weight: torch.Tensor = dequantize_module_weight(layer)
    if type(weight) not in (torch.Tensor, torch.nn.Parameter) and hasattr(weight, "dequantize"):
        weight = weight.dequantize()  # quanto's tensors, which PEFT hands back as they are
    return weight


# -- full fine-tuning ----------------------------------------------------------------------------------------


class FullFinetune(Adapter):
    kind = "full"
    can_disable = False

    def __init__(self, transformer: torch.nn.Module, family: ModelFamily, config: CoreOptions) -> None:
        super().__init__(transformer, family, config)
        transformer.requires_grad_(True)

    def save(self, output_dir: Path) -> list[Path]:
        folder = output_dir / FULL_FOLDER
        if folder.exists():
            shutil.rmtree(folder)
        model: Any = self.transformer
        if self.gathered is not None:  # sharded: an unsharded copy holding the gathered weights
            with torch.device("meta"):
                model = type(model).from_config(model.config)
            model.load_state_dict(self.gathered, assign=True)
        model.save_pretrained(folder, safe_serialization=True)
        return [folder]

    def load(self, folder: Path) -> None:
        from diffusers.models.model_loading_utils import load_state_dict

        path = folder / FULL_FOLDER if (folder / FULL_FOLDER).is_dir() else folder
        index = path / "diffusion_pytorch_model.safetensors.index.json"
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else None
        state: dict[str, torch.Tensor] = {}
        for name in files or ["diffusion_pytorch_model.safetensors"]:
            state.update(load_state_dict(str(path / name)))
        with tensors_fit(path, "transformer", "the same model"):
            missing, unexpected = self.transformer.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"The transformer in {path} does not fit this model ({len(missing)} missing, "
                f"{len(unexpected)} unexpected weights); resume with the same model."
            )


ADAPTERS: dict[str, type[Adapter]] = {"lora": PeftLora, "lycoris": Lycoris, "full": FullFinetune}


def adapter_kind(config: CoreOptions) -> str:
    if config.model_type == "full":
        return "full"
    return "lycoris" if config.lora_type == "lycoris" else "lora"


def create_adapter(
    transformer: torch.nn.Module, family: ModelFamily, config: CoreOptions, trainable_dtype: torch.dtype
) -> Adapter:
    """Add what is trained to the (frozen) transformer, optionally starting from ``init_lora``."""
    adapter = ADAPTERS[adapter_kind(config)](transformer, family, config)
    # Frozen weights may be bf16; the trained ones are kept in trainable_dtype (fp32 unless the
    # optimizer is built for bf16 weights) so small updates are not rounded away.
    adapter._cast_trainable(trainable_dtype)
    if config.init_lora:
        path = Path(config.init_lora)
        if not path.exists():
            raise ConfigError(f"init_lora {path} does not exist; fix the path.")
        adapter.load(path)
        log.info("adapter initialised from %s", path)
    return adapter
