# mypy: disable-error-code="empty-body"
"""The contract between the stune core and its plugins.

Every hook is a plain function here with a docstring saying **when it fires**, whether the core
collects every implementation's result or stops at the first non-None one (*firstresult*), and
what its arguments are. Plugins implement hooks with the marker exported as ``stune.hookimpl``::

    import stune

    @stune.hookimpl
    def register_families(register):
        register(MyFamily)

Two kinds of hooks:

* **Registration hooks** run once when the plugin manager starts. They hand the core objects
  (option models, model families, quantizers, training features, CLI commands); the objects carry
  the behaviour, so nothing in the training step goes through pluggy.
* **Lifecycle hooks** run at phase boundaries of a training run (DESIGN.md §3), never inside a
  model's forward pass. Observers (``on_*``) receive state and return nothing.

Implementations may accept any subset of a hook's arguments (pluggy's opt-in arguments); the core
always passes all of them. Default implementations live in ``stune._defaults`` and are registered
with ``trylast=True``, so a plugin's *firstresult* implementation wins over them.

Nothing here imports torch: the annotations are strings resolved only by type checkers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import argparse

    import torch

    from stune.adapters import Adapter
    from stune.config import Config
    from stune.family import Components, LoadRequest, ModelFamily
    from stune.features import TrainingFeature
    from stune.layout import TokenLayout
    from stune.options import Options
    from stune.publishing import Publisher
    from stune.quantize import Quantizer, QuantizeTarget
    from stune.state import TrainState
    from stune.step import Prediction, StepInputs

PROJECT = "stune"
hookspec = pluggy.HookspecMarker(PROJECT)
#: Marker for hook implementations; re-exported as ``stune.hookimpl``.
hookimpl = pluggy.HookimplMarker(PROJECT)

# ---------------------------------------------------------------------------------------------
# Registration hooks: called once, when the plugin manager starts.
# ---------------------------------------------------------------------------------------------


@hookspec
def register_options(register: Callable[[type[Options]], None]) -> None:
    """Register configuration options.

    Fires once when the registries are built, after every plugin is registered. Collecting.

    :param register: call ``register(OptionsModel)`` with a subclass of :class:`stune.Options`.
        Its fields become flat configuration keys next to the core's (SimpleTuner style, e.g.
        ``flux_lora_target``). Two plugins may declare the same key only with the same type and
        default (a shared option such as ``t5_padding``); otherwise it is an error naming both.
    """


@hookspec
def register_families(register: Callable[[type[ModelFamily]], None]) -> None:
    """Register model families (FLUX, SD3, …).

    Fires once when the registries are built. Collecting.

    :param register: call ``register(FamilyClass)`` with a subclass of
        :class:`stune.family.ModelFamily`; its ``name`` is what ``model_family`` selects.
    """


@hookspec
def register_quantizers(register: Callable[[type[Quantizer]], None]) -> None:
    """Register quantization backends.

    Fires once when the registries are built. Collecting.

    :param register: call ``register(QuantizerClass)`` with a subclass of
        :class:`stune.quantize.Quantizer`; its ``precisions`` (e.g. ``int8-quanto``) become valid
        values of ``base_model_precision`` and ``text_encoder_<N>_precision``.
    """


@hookspec
def register_features(register: Callable[[type[TrainingFeature]], None]) -> None:
    """Register training features (token routing, scheduled sampling, …).

    Fires once when the registries are built. Collecting.

    :param register: call ``register(FeatureClass)`` with a subclass of
        :class:`stune.features.TrainingFeature`. The core asks each feature whether the config
        enables it, checks that the model family declares what the feature requires, and drives
        the enabled ones through the run (inputs, extra loss terms, metrics, checkpoints).
    """


@hookspec
def register_publishers(register: Callable[[type[Publisher]], None]) -> None:
    """Register storage providers for ``publishing_config`` (S3, Azure Blob, Dropbox, …).

    Fires once when the registries are built. Collecting.

    :param register: call ``register(PublisherClass)`` with a subclass of
        :class:`stune.publishing.Publisher`; its ``name`` and ``aliases`` are the values a
        ``publishing_config`` entry's ``provider`` may take.
    """


@hookspec
def register_commands(
    register: Callable[
        [str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]],
        None,
    ],
) -> None:
    """Register extra ``st-train`` sub-commands.

    Fires when the CLI builds its parser for a sub-command it does not know itself. Collecting.

    :param register: call ``register(name, help, add_arguments, run)``; ``add_arguments(parser)``
        adds argparse arguments and ``run(namespace)`` returns the exit status.
    """


# ---------------------------------------------------------------------------------------------
# Lifecycle hooks: called by the training run at phase boundaries.
# ---------------------------------------------------------------------------------------------


@hookspec
def check_config(config: Config, family: ModelFamily) -> None:
    """Check option combinations before anything slow happens.

    Fires after the configuration is parsed and the family chosen, before any model, dataset or
    cache is touched. Collecting. Raise :class:`stune.ConfigError` with one sentence naming the
    options and the fix.

    :param config: the validated configuration.
    :param family: the model family instance for this run.
    """


@hookspec(firstresult=True)
def load_model(family: ModelFamily, config: Config, request: LoadRequest) -> Components:
    """Load the model components (text encoders, tokenizers, VAE, transformer, scheduler).

    Fires once, after :func:`check_config` and the dataset scan. *firstresult*: the first
    non-None result wins; the default calls ``family.load(request)``. Implement it to load
    components in a way the family does not know (a single-file checkpoint, a custom layout).

    :param family: the model family instance.
    :param config: the validated configuration.
    :param request: a :class:`stune.family.LoadRequest`: the device, the weight dtype, whether
        text encoders are needed (false when every caption is already cached, which saves
        loading them: T5-XXL alone is 9 GB), and per component a load-time dtype or
        quantization config from the quantizers (pass ``request.pretrained_kwargs(component)``
        to ``from_pretrained``).
    :returns: a :class:`stune.family.Components`; text encoders and the VAE on the device, the
        transformer on the CPU (the core moves it once the encoders are gone).
    """


@hookspec
def quantize(components: Components, family: ModelFamily, config: Config, targets: list[QuantizeTarget]) -> None:
    """Quantize loaded components in place.

    Fires once, right after :func:`load_model` and before caching and adapters (adapters are
    always added on top of quantized weights). Collecting. The default hands each target to the
    quantizer registered for its precision, block by block.

    :param components: the loaded components; replace or modify modules in place.
    :param family: the model family instance (its quantization exclusions are data on it).
    :param config: the validated configuration.
    :param targets: the :class:`stune.quantize.QuantizeTarget` components still to quantize
        (those not already quantized while loading).
    """


@hookspec(firstresult=True)
def encode_text(
    family: ModelFamily, components: Components, prompts: list[str], config: Config
) -> list[dict[str, torch.Tensor]]:
    """Encode captions into the tensors the transformer is conditioned on.

    Fires while the text-embedding cache is filled (training captions, validation prompts),
    once per batch of captions that is not cached yet. *firstresult*: the default calls
    ``family.encode_prompts``. (What a dropped caption trains on comes from
    ``family.unconditional_embeds``.)

    :param family: the model family instance.
    :param components: loaded components (text encoders on the accelerator).
    :param prompts: the captions to encode.
    :param config: the validated configuration.
    :returns: one dict of CPU tensors (no batch dimension) per prompt; it is stored as is.
    """


@hookspec(firstresult=True)
def compute_loss(
    prediction: Prediction, inputs: StepInputs, family: ModelFamily, config: Config, state: TrainState
) -> torch.Tensor:
    """Compute the scalar diffusion loss of one micro-batch.

    Fires once per training micro-step, after the forward pass. *firstresult*: the default is
    the mean of ``loss_type``'s error (squared by default; huber/smooth_l1 with ``huber_c`` over σ)
    between ``prediction.velocity`` and ``inputs.target``, weighted per element by
    ``inputs.loss_weight`` when present. Use a wrapper (``@hookimpl(wrapper=True)``)
    to modify what the others compute. The prediction's auxiliary losses are added by the core
    after this hook, with their weights.

    :param prediction: a :class:`stune.step.Prediction` (``velocity`` in latent layout).
    :param inputs: the :class:`stune.step.StepInputs` the model saw; ``inputs.target`` is the
        regression target (``noise - latents``, or the base model's prediction for
        regularisation data).
    :param family: the model family instance.
    :param config: the validated configuration.
    :param state: the training state (step, epoch).
    :returns: a scalar tensor to back-propagate.
    """


@hookspec
def route_tokens(
    family: ModelFamily,
    transformer: torch.nn.Module,
    layout: TokenLayout | None,
    features: dict[str, TrainingFeature],
    config: Config,
) -> None:
    """Install token routing (e.g. TREAD) into the transformer.

    Fires once, after adapters and gradient checkpointing are in place and the features are
    bound, before the optimizer is built. Collecting. A router installs module hooks on the
    blocks ``layout`` names (never dispatching through pluggy per block) and routes only in
    training forwards (:func:`stune.step.in_training_forward`).

    :param family: the model family instance.
    :param transformer: the trainable transformer (with adapters).
    :param layout: the family's :class:`stune.layout.TokenLayout`, None if it declares none.
    :param features: the run's enabled features by name (a router finds its own instance here:
        its options, its seeded generator, its checkpointed state).
    :param config: the validated configuration.
    """


@hookspec(firstresult=True)
def save_adapter(
    family: ModelFamily, transformer: torch.nn.Module, adapter: Adapter, output_dir: Path, config: Config
) -> list[Path]:
    """Write the trained weights in their loadable format.

    Fires for every checkpoint, for the final export and for the EMA export. *firstresult*: the
    default is ``adapter.save(output_dir)``: a PEFT LoRA through the family's diffusers pipeline
    class (``pytorch_lora_weights.safetensors``, alpha in the metadata), a LyCORIS network in its
    own format plus ``lycoris_config.json``, or a full diffusers ``transformer/`` folder.

    :param family: the model family instance.
    :param transformer: the trained transformer (unwrapped from accelerate).
    :param adapter: what is trained (:class:`stune.adapters.Adapter`; ``kind`` is lora, lycoris or full).
    :param output_dir: the folder to write into (exists).
    :param config: the validated configuration.
    :returns: the files written.
    """


# ---------------------------------------------------------------------------------------------
# Observers: called at fixed points; return nothing.
# ---------------------------------------------------------------------------------------------


@hookspec
def on_train_start(state: TrainState, config: Config) -> None:
    """Fires once, right before the first training step (after resume). Collecting.

    :param state: the training state (``global_step`` is the resumed step).
    :param config: the validated configuration.
    """


@hookspec
def on_step_end(state: TrainState, metrics: dict[str, float]) -> None:
    """Fires after every optimizer step, on the main process. Collecting.

    :param state: the training state after the step.
    :param metrics: what is written to ``metrics.jsonl`` for this step (step, loss, lr,
        grad_norm, step_seconds, samples_per_second).
    """


@hookspec
def on_checkpoint_saved(state: TrainState, path: Path) -> None:
    """Fires after a checkpoint folder is complete (renamed into place). Collecting.

    :param state: the training state.
    :param path: the finished ``checkpoint-<step>`` folder.
    """


@hookspec
def on_validation_done(state: TrainState, images: list[Path]) -> None:
    """Fires after validation images are written. Collecting.

    :param state: the training state.
    :param images: the image files written under ``output_dir/validation_images``.
    """


@hookspec
def on_train_end(state: TrainState, output_dir: Path) -> None:
    """Fires once after the final export. Collecting.

    :param state: the final training state.
    :param output_dir: the run's output folder.
    """
