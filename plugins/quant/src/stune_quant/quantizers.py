"""The precisions stune-quant provides, and the path each one takes.

====================  ============================================  ==========================  =====================
precision             weights                                       how                         where it runs
====================  ============================================  ==========================  =====================
bf16 / fp16 / fp32    the base loaded in that dtype (not quantized) ``from_pretrained`` dtype   anywhere
int8/int4/int2-quanto optimum-quanto qint8 / qint4 / qint2          block by block after load   CPU, CUDA (int4/int2:
fp8-quanto            optimum-quanto qfloat8 (e4m3fn)                                           C++ extension)
fp8uz-quanto          optimum-quanto qfloat8_e4m3fnuz
int8-torchao          torchao Int8WeightOnlyConfig                  block by block, or while    CPU, CUDA
fp8wo-torchao         torchao Float8WeightOnlyConfig                loading (quantize_via=
int4-torchao          CPU: IntxWeightOnlyConfig(int4, group 32)     pipeline: TorchAoConfig)
                      CUDA: Int4WeightOnlyConfig, tile-packed bf16  block by block on the GPU   CUDA
fp8-torchao           Float8DynamicActivationFloat8WeightConfig     block by block on the GPU   CUDA, capability ≥ 8.9
int8dq-torchao        Int8DynamicActivationInt8WeightConfig         block by block on the GPU   CUDA
nf4-bnb               bitsandbytes NF4                              CUDA: while loading          CPU, CUDA
                                                                    (BitsAndBytesConfig); CPU:
                                                                    Linear → LinearNF4 per block
====================  ============================================  ==========================  =====================

Why these paths:

* quanto never goes through diffusers' ``QuantoConfig``: diffusers 0.42 deprecates it (removal in
  1.0), it has no e4m3fnuz, and it matches exclusions by substring rather than the families'
  fnmatch patterns. ``quantize_via=pipeline`` therefore quantizes quanto precisions block by block
  right after loading (it says so in the log), which needs less host memory than a load-time
  quantizer anyway (see :mod:`stune_quant.hostmem` and bench/quantization.py).
* torchao's int8 / fp8 weight-only / CPU int4 formats are device-independent, so they take the load-time
  path (``TorchAoConfig`` with an ``FqnToConfig`` that maps the exclusions to ``None``) when asked.
  The CUDA int4 layout, float8 dynamic activations and int8 dynamic activations are quantized on the
  GPU, block by block, whatever ``quantize_via`` says.
* nf4-bnb on CUDA loads through ``BitsAndBytesConfig`` (diffusers for the transformer,
  transformers for text encoders), as bitsandbytes and SimpleTuner intend; diffusers refuses it without
  a GPU, so on the CPU each Linear is swapped for a ``bnb.nn.LinearNF4`` (CPU 4-bit kernels).

Block by block: :func:`stune.quantize.blocks_of` gives the transformer's blocks in order; inside a
block each Linear not matched by the family's exclusions (fnmatch on the full module name) is
quantized and its bf16 pages handed back at once, so host memory peaks near the quantized size plus
one layer. The transformer's first quantized layer is then probed for a gradient: a backend that
passes none back through the base (a LoRA would not learn) stops the run with one sentence.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import logging
import shutil
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from stune.errors import ConfigError, UserError
from stune.quantize import TRANSFORMER, Quantizer, QuantizeTarget, blocks_of
from stune_quant import hostmem

if TYPE_CHECKING:
    import torch

    from stune.family import ModelFamily

log = logging.getLogger("stune_quant")


def excluded(name: str, patterns: tuple[str, ...]) -> bool:
    """A module is left in high precision when its full name matches one of the family's patterns."""
    return any(name == p or fnmatch.fnmatchcase(name, p) for p in patterns)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


# -- dtype only ------------------------------------------------------------------------------------------


class DtypePrecision(Quantizer):
    """``bf16`` / ``fp16`` / ``fp32``: load the component in that dtype (the FLUX seed's advice when
    quantizing runs out of host memory). Nothing is quantized: full fine-tuning stays possible."""

    name = "dtype"
    precisions = ("bf16", "fp16", "fp32")

    def is_quantized(self, precision: str) -> bool:
        return False

    def check(self, target: QuantizeTarget, family: ModelFamily) -> None:
        from stune._defaults import weight_dtype

        # Without autocast the transformer's inputs come in base_model_default_dtype; other dtypes clash.
        clash = self.load_dtype(target) != weight_dtype(self.config)
        if target.component == TRANSFORMER and self.config.mixed_precision == "no" and clash:
            raise ConfigError(
                f"base_model_precision={target.precision} loads the transformer in another dtype than its "
                "inputs, which needs autocast; set mixed_precision=bf16 (or fp16), or base_model_precision "
                "no_change."
            )

    def load_dtype(self, target: QuantizeTarget) -> torch.dtype:
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[target.precision]

    def quantize(self, module: torch.nn.Module, target: QuantizeTarget) -> torch.nn.Module:
        return module  # loaded in its dtype already


# -- block by block: what every backend shares ------------------------------------------------------------


class BlockwiseQuantizer(Quantizer):
    """A backend that quantizes Linear layers of a loaded module, block by block."""

    #: import name checked before anything loads, and the pip extra that installs it
    package: ClassVar[str]
    extra: ClassVar[str]

    # -- checks ------------------------------------------------------------------------------------------
    def check(self, target: QuantizeTarget, family: ModelFamily) -> None:
        if not _installed(self.package):
            raise UserError(
                f"{target.option}={target.precision} needs {self.package.split('.')[-1]}, which is not installed; "
                f"install it with `pip install 'stune-quant[{self.extra}]'`."
            )
        cfg = self.config
        loftq = cfg.model_type == "lora" and cfg.lora_type == "standard" and cfg.lora_init_type == "loftq"
        if target.component == TRANSFORMER and loftq:
            raise ConfigError(
                f"lora_init_type=loftq cannot start from a {target.precision} base: LoftQ fits the LoRA to the "
                "unquantized weights and quantizes them itself with bitsandbytes; use another lora_init_type, "
                "or base_model_precision no_change."
            )
        self.check_precision(target)

    def check_precision(self, target: QuantizeTarget) -> None:
        """Backend-specific refusals (a missing GPU, compiler, …)."""

    # -- where -------------------------------------------------------------------------------------------
    def quantized_on_gpu(self, precision: str) -> bool:
        """Whether the precision's quantized layout exists only on CUDA (quantized on the GPU whatever
        quantize_via says)."""
        return False

    def quantize_device(self, module: torch.nn.Module, target: QuantizeTarget) -> torch.device:
        """Text encoders are quantized where the family put them; the transformer on the accelerator
        unless quantize_via=cpu (a CUDA-only layout always on the GPU)."""
        import torch

        here = _device_of(module)
        if target.component != TRANSFORMER or target.device is None:
            return here
        if self.quantized_on_gpu(target.precision) or self.config.quantize_via != "cpu":
            return target.device
        return torch.device("cpu")

    # -- the walk ----------------------------------------------------------------------------------------
    def quantize(self, module: torch.nn.Module, target: QuantizeTarget) -> torch.nn.Module:
        if self.config.quantize_via == "pipeline" and self.load_config(target) is None:
            why = self.pipeline_note if target.component == TRANSFORMER else "text encoders are quantized after loading"
            log.info(
                "%s: %s is quantized block by block right after loading: %s", target.component, target.precision, why
            )
        device = self.quantize_device(module, target)
        shared = _shared_storages(module)
        done = skipped = 0
        first: tuple[torch.nn.Linear, torch.dtype] | None = None
        for block_name, block in blocks_of(module):
            if _device_of(block) != device:
                before = hostmem.ranges([*block.parameters(), *block.buffers()])
                block.to(device)
                hostmem.release([r for r in before if r[0] not in shared])
            for name, parent, child, layer in _linear_layers(module, block, block_name):
                if excluded(name, target.exclude):
                    skipped += 1
                    continue
                dtype = layer.weight.dtype
                replaced = [r for r in hostmem.ranges([layer.weight]) if r[0] not in shared]
                quantized = self.quantize_layer(layer, target)
                if quantized is None:  # this backend leaves the layer as it is (e.g. an odd shape)
                    skipped += 1
                    continue
                if quantized is not layer:
                    setattr(parent, child, quantized)
                    layer.weight = None  # type: ignore[assignment]  # drop our last reference to the old weights
                quantized.requires_grad_(False)
                hostmem.release(replaced)
                first = first or (quantized, dtype)
                done += 1
            hostmem.trim_heap()
        log.info(
            "%s: %d linear layers quantized to %s on %s (%d left in high precision)",
            target.component,
            done,
            target.precision,
            device,
            skipped,
        )
        if target.component == TRANSFORMER and first is not None:
            self._probe_gradient(*first, target)
        return module

    #: why quantize_via=pipeline did not load this precision through a diffusers config
    pipeline_note: ClassVar[str] = "this backend has no load-time path for it"

    def quantize_layer(self, layer: torch.nn.Linear, target: QuantizeTarget) -> torch.nn.Module | None:
        """The quantized replacement of one Linear (or the same module, quantized in place)."""
        raise NotImplementedError

    def _probe_gradient(self, layer: torch.nn.Module, dtype: torch.dtype, target: QuantizeTarget) -> None:
        """A LoRA learns only if the gradient flows back through the frozen quantized layers."""
        import torch

        device = next((p.device for p in layer.parameters()), torch.device("cpu"))
        # 16 rows: float8 matmuls want a multiple of 16.
        probe = torch.randn(16, layer.in_features, device=device, dtype=dtype, requires_grad=True)  # type: ignore[arg-type]
        try:
            with torch.enable_grad():
                layer(probe).float().square().sum().backward()
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:  # e.g. "derivative for aten::_scaled_mm is not implemented"
            log.debug("gradient probe of %s: %s", target.precision, exc)
        grad = probe.grad
        if grad is None or not bool(torch.isfinite(grad).all()) or not bool(grad.abs().sum() > 0):
            raise UserError(
                f"base_model_precision={target.precision} passes no gradient back through the quantized base on "
                f"this machine ({device}), so a LoRA could not learn; use int8-quanto or int8-torchao."
            )


def _device_of(module: torch.nn.Module) -> torch.device:
    import torch

    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def _shared_storages(module: torch.nn.Module) -> set[int]:
    """Storages more than one parameter uses (tied weights): never handed back."""
    counts = Counter(p.untyped_storage().data_ptr() for _, p in module.named_parameters(remove_duplicate=False))
    return {ptr for ptr, n in counts.items() if n > 1}


def _linear_layers(
    root: torch.nn.Module, block: torch.nn.Module, prefix: str
) -> list[tuple[str, torch.nn.Module, str, Any]]:
    """(full name, parent, attribute, layer) for each plain Linear of ``block`` (the block itself
    included), listed before any is replaced."""
    import torch

    found = []
    for rel, layer in block.named_modules():
        if isinstance(layer, torch.nn.Linear) and not _is_quantized_weight(layer):
            name = f"{prefix}.{rel}" if rel else prefix
            parent, _, child = name.rpartition(".")
            found.append((name, root.get_submodule(parent), child, layer))
    return found


def _is_quantized_weight(layer: torch.nn.Module) -> bool:
    import torch

    weight = getattr(layer, "weight", None)
    return weight is not None and type(weight) not in (torch.Tensor, torch.nn.Parameter)


# -- optimum-quanto ----------------------------------------------------------------------------------------


class QuantoQuantizer(BlockwiseQuantizer):
    name = "quanto"
    precisions = ("int8-quanto", "int4-quanto", "int2-quanto", "fp8-quanto", "fp8uz-quanto")
    package = "optimum.quanto"
    extra = "quanto"
    pipeline_note = "diffusers 0.42 deprecates QuantoConfig"
    _QTYPES: ClassVar[dict[str, str]] = {
        "int8-quanto": "qint8",
        "int4-quanto": "qint4",
        "int2-quanto": "qint2",
        "fp8-quanto": "qfloat8",
        "fp8uz-quanto": "qfloat8_e4m3fnuz",
    }

    def check_precision(self, target: QuantizeTarget) -> None:
        import torch

        if target.precision.startswith("fp8") and torch.backends.mps.is_available() and not _cuda():
            raise UserError(f"{target.option}={target.precision} does not run on Apple GPUs (MPS); use int8-quanto.")
        if target.precision in ("int4-quanto", "int2-quanto"):
            extension = "quanto_cuda" if _cuda() else "quanto_cpp"
            missing = quanto_toolchain_missing(extension)
            if missing:
                raise UserError(
                    f"{target.option}={target.precision} needs optimum-quanto's {extension} extension, which is not "
                    f"built and cannot be built here ({missing} not found); run `python -m stune_quant.warmup` where "
                    "a compiler is installed, or use int8-quanto."
                )

    def quantize_layer(self, layer: torch.nn.Linear, target: QuantizeTarget) -> torch.nn.Module | None:
        import optimum.quanto as quanto
        from optimum.quanto.nn import quantize_module

        qmodule = quantize_module(layer, weights=getattr(quanto, self._QTYPES[target.precision]))
        if qmodule is None:
            return None
        trains_on_cpu = target.device is None or target.device.type == "cpu"
        cpu = trains_on_cpu and layer.weight.device.type == "cpu"
        if target.precision == "int4-quanto" and cpu and qmodule.weight_group_size == 128:
            # With groups of 128, quanto packs bf16 int4 weights for tinygemm, whose CPU backward unpacks
            # them by multiplying with an identity matrix (seconds per FLUX layer). Groups of 64 keep
            # its plain layout, unpacked by its C++ kernel: ~10× faster backward, a little more accurate.
            qmodule.weight_group_size = 64
        qmodule.freeze()  # the integer weights replace the float ones here
        if target.precision == "int8-quanto":
            qmodule.register_forward_pre_hook(_aligned_cpu_input)
        return qmodule  # type: ignore[no-any-return]


def _aligned_cpu_input(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """On the CPU, quanto's int8 × bf16 matmul (``torch._weight_int8pack_mm``, torch 2.13) crashes the
    process on an input that does not start on a 64-byte boundary — a row of a cached batch, say, as
    validation passes. Such an input is copied to fresh (aligned) memory first."""
    import torch

    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.data_ptr() % 64:
        return (x.clone(memory_format=torch.contiguous_format), *args[1:])
    return None


def quanto_extension_built(extension: str) -> bool:
    """Whether optimum-quanto's C++/CUDA extension is compiled for the installed torch."""
    import torch

    spec = importlib.util.find_spec("optimum.quanto")
    if spec is None or spec.origin is None:
        return False
    sub = {"quanto_cpp": "cpp", "quanto_cuda": "cuda"}[extension]
    build = Path(spec.origin).parent / "library" / "extensions" / sub / "build"
    version = build / "pytorch_version.txt"
    return (
        (build / f"{extension}.so").is_file() and version.is_file() and version.read_text().strip() == torch.__version__
    )


def quanto_toolchain_missing(extension: str) -> str:
    """What is missing to build the extension ('' when it is built, or can be on first use)."""
    if quanto_extension_built(extension):
        return ""
    tools = [("a C++ compiler", shutil.which("c++") or shutil.which("g++")), ("ninja", _ninja())]
    if extension == "quanto_cuda":
        from torch.utils.cpp_extension import CUDA_HOME

        tools.append(("nvcc", CUDA_HOME and shutil.which("nvcc", path=str(Path(CUDA_HOME) / "bin"))))
    return ", ".join(what for what, found in tools if not found)


def _ninja() -> str | None:
    from torch.utils.cpp_extension import is_ninja_available

    return "ninja" if is_ninja_available() else None


# -- torchao -------------------------------------------------------------------------------------------------


class TorchaoQuantizer(BlockwiseQuantizer):
    name = "torchao"
    precisions = ("int8-torchao", "int4-torchao", "fp8-torchao", "fp8wo-torchao", "int8dq-torchao")
    package = "torchao"
    extra = "torchao"
    pipeline_note = "its CUDA layout is built on the GPU"
    #: torchao's CPU int4 path (group-wise int4 values, stored unpacked in int8)
    INT4_CPU_GROUP = 32

    def quantized_on_gpu(self, precision: str) -> bool:
        return precision in ("fp8-torchao", "int8dq-torchao", "int4-torchao") and _cuda()

    def check_precision(self, target: QuantizeTarget) -> None:
        import torch

        if target.precision == "fp8-torchao":
            capability = torch.cuda.get_device_capability() if _cuda() else None
            if capability is None or capability < (8, 9):
                raise UserError(
                    f"{target.option}=fp8-torchao needs a CUDA GPU of compute capability ≥ 8.9 (Ada, Hopper or "
                    "newer) for float8 matmuls; use fp8wo-torchao or int8-torchao here."
                )
        if target.precision == "int8dq-torchao" and not _cuda():
            raise UserError(
                f"{target.option}=int8dq-torchao needs a CUDA GPU: on the CPU torchao's int8 dynamic-activation "
                "matmul passes no gradient back through the base, so a LoRA could not learn; use int8-torchao."
            )

    def load_dtype(self, target: QuantizeTarget) -> torch.dtype | None:
        import torch

        # The CUDA int4 kernel (tinygemm) packs bf16 weights only.
        return torch.bfloat16 if target.precision == "int4-torchao" and _cuda() else None

    def ao_config(self, precision: str) -> Any:
        """The torchao config of a precision on this machine."""
        import torch
        import torchao.quantization as tq

        if precision == "int8-torchao":
            return tq.Int8WeightOnlyConfig()
        if precision == "fp8wo-torchao":
            return tq.Float8WeightOnlyConfig()
        if precision == "fp8-torchao":
            return tq.Float8DynamicActivationFloat8WeightConfig(granularity=tq.PerRow())
        if precision == "int8dq-torchao":
            return tq.Int8DynamicActivationInt8WeightConfig()
        if _cuda():
            from torchao.quantization.quantize_.workflows.int4.int4_packing_format import Int4PackingFormat

            return tq.Int4WeightOnlyConfig(group_size=128, int4_packing_format=Int4PackingFormat.TILE_PACKED_TO_4D)
        from torchao.quantization.granularity import PerGroup

        return tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(self.INT4_CPU_GROUP))

    def load_config(self, target: QuantizeTarget) -> Any | None:
        if self.config.quantize_via != "pipeline" or target.component != TRANSFORMER:
            return None
        if self.quantized_on_gpu(target.precision):
            return None
        from diffusers import TorchAoConfig
        from torchao.quantization import FqnToConfig

        # diffusers resolves "re:" keys with re.fullmatch against each Linear's name; None keeps it as loaded.
        mapping: dict[str, Any] = {f"re:{fnmatch.translate(p)}": None for p in target.exclude}
        mapping["_default"] = self.ao_config(target.precision)
        return TorchAoConfig(FqnToConfig(mapping))

    def quantize_layer(self, layer: torch.nn.Linear, target: QuantizeTarget) -> torch.nn.Module | None:
        import torch
        from torchao.quantization import quantize_

        if target.precision == "int4-torchao" and layer.in_features % (128 if _cuda() else self.INT4_CPU_GROUP):
            return None  # int4 groups must tile the input features
        holder = torch.nn.Module()  # quantize_ may replace a module in its parent: give the layer one
        holder.layer = layer
        quantize_(holder, self.ao_config(target.precision), filter_fn=lambda m, fqn: fqn == "layer")
        return holder.layer


# -- bitsandbytes ------------------------------------------------------------------------------------------------


class BnbQuantizer(BlockwiseQuantizer):
    name = "bnb"
    precisions = ("nf4-bnb",)
    package = "bitsandbytes"
    extra = "bnb"
    pipeline_note = "diffusers' BitsAndBytesConfig needs a CUDA GPU"

    def load_config(self, target: QuantizeTarget) -> Any | None:
        if not _cuda():
            return None
        from stune._defaults import weight_dtype

        settings = {
            "load_in_4bit": True,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_compute_dtype": weight_dtype(self.config),
            "llm_int8_skip_modules": bnb_skip_modules(target.exclude),
        }
        if target.component == TRANSFORMER:
            from diffusers import BitsAndBytesConfig

            return BitsAndBytesConfig(**settings)
        from transformers import BitsAndBytesConfig as TransformersBitsAndBytesConfig

        return TransformersBitsAndBytesConfig(**settings)

    def quantize_layer(self, layer: torch.nn.Linear, target: QuantizeTarget) -> torch.nn.Module | None:
        import bitsandbytes as bnb

        dtype, device = layer.weight.dtype, layer.weight.device
        # Built on the meta device: its own float weight would cost a full copy; ours goes in instead.
        qlayer = bnb.nn.LinearNF4(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            compute_dtype=dtype,
            compress_statistics=False,  # as diffusers' BitsAndBytesConfig (bnb_4bit_use_double_quant=False)
            device="meta",
        )
        weight = bnb.nn.Params4bit(
            layer.weight.data, requires_grad=False, quant_type="nf4", compress_statistics=False, module=qlayer
        )
        qlayer.weight = weight.to(device)  # Params4bit quantizes on its first move
        # bitsandbytes 0.50 repacks a 4-bit weight in place for its CPU kernel on the first forward in
        # eval mode without gradient (validation); the next training forward then fails ("a view of a
        # leaf Variable ... in-place"), and a layer narrower than a 64-value block crashes outright.
        qlayer.support_avx512bf16_for_cpu = False
        if layer.bias is not None:
            qlayer.bias = layer.bias
        return qlayer


def bnb_skip_modules(patterns: tuple[str, ...]) -> list[str]:
    """The exclusions in BitsAndBytesConfig's terms: it skips a module whose name equals a key or
    has ``key.`` in it. An exact name stays; ``*.name`` / ``name*`` / ``*name*`` become ``name``
    (slightly broader than fnmatch: a child of that module is skipped too)."""
    keys = []
    for pattern in patterns:
        core = pattern.strip("*").strip(".")
        if core and not any(c in core for c in "*?["):
            keys.append(core)
    return sorted(set(keys))
