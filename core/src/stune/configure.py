"""``st-train configure``: the terminal wizard every SimpleTuner quickstart starts with.

It asks for the model family and flavour, the base model, the adapter (LoRA rank, a LyCORIS preset
or a full fine-tune), the precision, the dataset folders and where their captions come from, the
resolution, the steps and the validation prompt. Each answer is checked as it is given with the
config loader's own rules (:func:`stune.config.validate_config`, the family's checks and every
cross-option check of :func:`stune.checks.check_run`), so a mistake is named at once and the
question asked again. The answers go into ``config/config.json`` and
``config/multidatabackend.json`` (and ``config/lycoris_config.json`` for a LyCORIS preset) through
:mod:`stune.project`: a file that exists keeps its other keys, and is only written after a yes.
``--yes`` with flags answers everything for scripts.

Plain ``input()`` prompts, no curses: it works over ssh, in a pseudo-terminal and with piped answers.
Nothing here imports torch.
"""

from __future__ import annotations

import argparse
import functools
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar

from stune.config import CoreOptions, normalise_key, read_config_file, validate_config
from stune.errors import ConfigError, UserError
from stune.options import option_names
from stune.plugins import PluginHost
from stune.project import (
    CONFIG_FILE,
    DATASETS_FILE,
    LYCORIS_FILE,
    LYCORIS_PRESETS,
    edit_config,
    read_document,
    save_json,
)

T = TypeVar("T")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
ADAPTERS = ("lora", "lycoris", "full")
CAPTIONS = ("textfile", "filename", "instanceprompt")


class Cancelled(UserError):
    """The user left the wizard (Ctrl-D, Ctrl-C or no more input); nothing was written."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default=".", help="the project folder that gets config/ (default: here)")
    parser.add_argument(
        "--yes", "-y", action="store_true", help="ask nothing: flags and defaults answer, files are written"
    )
    parser.add_argument("--family", help="model family (an installed family plugin, e.g. flux)")
    parser.add_argument("--flavour", help="the family's flavour (e.g. dev, schnell)")
    parser.add_argument("--model", help="base model: a local diffusers folder or a Hub id (default: the flavour's)")
    parser.add_argument("--adapter", choices=ADAPTERS, help="lora (PEFT), lycoris (a preset) or full fine-tuning")
    parser.add_argument("--lora-rank", help="LoRA rank")
    parser.add_argument("--lycoris-preset", choices=sorted(LYCORIS_PRESETS), help="LyCORIS preset")
    parser.add_argument("--mixed-precision", help="bf16, fp16 or no")
    parser.add_argument("--base-precision", help="base model quantization (needs stune-quant), e.g. int8-quanto")
    parser.add_argument("--dataset", action="append", metavar="FOLDER", help="a folder of images (repeatable)")
    parser.add_argument("--captions", choices=CAPTIONS, help="where captions come from (default: textfile if found)")
    parser.add_argument("--instance-prompt", help="the caption of every image, for --captions instanceprompt")
    parser.add_argument("--replace-datasets", action="store_true", help="drop the datasets already in the list")
    parser.add_argument("--resolution", help="training resolution in pixels")
    parser.add_argument("--steps", help="optimizer steps to train (max_train_steps)")
    parser.add_argument("--batch-size", help="samples per batch (train_batch_size)")
    parser.add_argument("--learning-rate", help="learning rate")
    parser.add_argument("--validation-prompt", help="prompt of the validation images ('' for none)")
    parser.add_argument("--output-dir", help="where the adapter, checkpoints and images go")


class Wizard:
    """Questions, answers and the files they become."""

    def __init__(
        self,
        host: PluginHost,
        args: argparse.Namespace,
        ask: Callable[[str], str] | None,
        out: TextIO,
    ) -> None:
        self.host = host
        self.args = args
        self.ask = ask  # None: --yes, nothing is asked
        self.out = out
        self.project = Path(args.dir)
        self.model = host.config_model()
        #: the answers so far, as config keys (what config.json receives)
        self.raw: dict[str, Any] = {}
        self.datasets: list[dict[str, Any]] = []
        self.lycoris: dict[str, Any] | None = None

    # -- asking ------------------------------------------------------------------------------------
    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def question(
        self,
        prompt: str,
        flag: str,
        given: str | None,
        default: str | None,
        parse: Callable[[str], T],
        choices: Sequence[str] = (),
    ) -> T:
        """An answer from its flag, the user or the default, parsed and checked; asked again after a mistake."""
        if given is not None:
            try:
                return parse(given)
            except UserError as exc:
                if self.ask is None:
                    raise UserError(f"--{flag}: {exc}") from None
                self.say(f"  ✗ --{flag}: {exc}")
        if self.ask is None:
            if default is None:
                raise UserError(f"{prompt} has no default; pass --{flag}.")
            return parse(default)
        hint = f" ({', '.join(choices)})" if choices and len(choices) > 1 else ""
        suffix = f" [{default}]" if default else ""
        while True:
            answer = self._input(f"{prompt}{hint}{suffix}: ").strip()
            if not answer:
                if default is None:
                    self.say("  ✗ an answer is needed here.")
                    continue
                answer = default
            if choices and answer.isdigit() and 0 < int(answer) <= len(choices) and answer not in choices:
                answer = choices[int(answer) - 1]
            try:
                return parse(answer)
            except UserError as exc:
                self.say(f"  ✗ {exc}")

    def confirm(self, prompt: str, default: bool) -> bool:
        if self.ask is None:
            return True
        while True:
            answer = self._input(f"{prompt} [{'Y/n' if default else 'y/N'}]: ").strip().lower()
            if not answer:
                return default
            if answer in ("y", "yes", "n", "no"):
                return answer.startswith("y")
            self.say("  ✗ answer y or n.")

    def _input(self, prompt: str) -> str:
        assert self.ask is not None
        try:
            return self.ask(prompt)
        except (EOFError, KeyboardInterrupt):
            self.say()
            raise Cancelled("configure stopped before the end; nothing was written.") from None

    # -- checking ------------------------------------------------------------------------------------
    def check(self, **answers: Any) -> None:
        """Validate the answers so far plus these, as the config loader would; keep them if they pass."""
        raw = {**self.raw, **answers}
        config = checked(dict(raw), self.host)
        # Typed values in the file (64, not "64"), as the loader understood them.
        self.raw = {**self.raw, **{key: _typed(value, getattr(config, key)) for key, value in answers.items()}}

    # -- the questions -------------------------------------------------------------------------------
    def run(self) -> int:
        a = self.args
        self.say(f"stune configure: the answers go to {self.project / CONFIG_FILE} and {self.project / DATASETS_FILE}.")
        if self.ask is not None:
            self.say("Press Enter to take the [default]; Ctrl-D leaves without writing anything.\n")
        families = sorted(self.host.families)
        if not families:
            packages = ", ".join(e.distribution for e in self.host.catalog.values() if e.families)
            raise UserError(f"No model family plugin is installed; install one ({packages}).")
        family = self.question(
            "Model family", "family", a.family, families[0] if len(families) == 1 else None, self._family, families
        )
        family_cls = self.host.families[family]
        flavours = list(family_cls.flavours)
        if flavours:
            self.question(
                f"{family} flavour", "flavour", a.flavour, family_cls.default_flavour, self._flavour, flavours
            )
        repo = family_cls.flavours.get(self.raw.get("model_flavour") or "", None)
        self.question("Base model: a local diffusers folder or a Hub id", "model", a.model, repo, self._model_path)
        adapter = self.question("Adapter", "adapter", a.adapter, "lora", self._adapter, ADAPTERS)
        if adapter == "lora":
            self.question("LoRA rank", "lora-rank", a.lora_rank, "16", lambda v: self._set("lora_rank", v))
        elif adapter == "lycoris":
            presets = sorted(LYCORIS_PRESETS)
            for name in presets:
                self.say(f"  {name}: {LYCORIS_PRESETS[name]['title']}")
            self.question("LyCORIS preset", "lycoris-preset", a.lycoris_preset, presets[0], self._preset, presets)
        self.question(
            "Mixed precision", "mixed-precision", a.mixed_precision, "bf16", self._mixed, ("bf16", "fp16", "no")
        )
        if "base_model_precision" in self.model.model_fields:
            precisions = ["no_change", *sorted(self.host.quantizers)]
            self.question(
                "Base model quantization",
                "base-precision",
                a.base_precision,
                "no_change",
                lambda v: self._set("base_model_precision", v),
                precisions,
            )
        self._ask_datasets()
        self.question("Training resolution (pixels)", "resolution", a.resolution, "1024", self._resolution)
        self.question("Training steps", "steps", a.steps, "1000", self._steps)
        self.question("Batch size", "batch-size", a.batch_size, "1", lambda v: self._set("train_batch_size", v))
        default_lr = str(self.model.model_fields["learning_rate"].default)
        self.question("Learning rate", "learning-rate", a.learning_rate, default_lr, self._learning_rate)
        self.question(
            "Validation prompt (empty: no validation images)",
            "validation-prompt",
            a.validation_prompt,
            "",
            self._validation_prompt,
        )
        self.question("Output folder", "output-dir", a.output_dir, "output", lambda v: self._set("output_dir", v))
        return self.write()

    def _ask_datasets(self) -> None:
        a = self.args
        folders = list(a.dataset or [])
        if self.ask is None and not folders:
            raise UserError("A dataset folder is needed; pass --dataset FOLDER.")
        from_flags = bool(folders)
        while True:
            if folders:
                given: str | None = folders.pop(0)
            elif from_flags or (self.datasets and not self.confirm("Add another dataset folder?", False)):
                break
            else:
                given = None
            number = len(self.datasets) + 1
            folder = self.question(f"Dataset {number}: folder of images", "dataset", given, None, self._folder)
            images, texts = _count_images(self._local(folder))
            self.say(f"  {images} images, {texts} with a caption .txt file")
            strategy = self.question(
                f"Dataset {number}: captions from",
                "captions",
                a.captions,
                "textfile" if texts else "filename",
                functools.partial(_caption_strategy, caption_files=texts),
                CAPTIONS,
            )
            entry: dict[str, Any] = {
                "id": self._dataset_id(folder),
                "type": "local",
                "instance_data_dir": folder,
                "caption_strategy": strategy,
            }
            if strategy == "instanceprompt":
                entry["instance_prompt"] = self.question(
                    f"Dataset {number}: the caption of every image", "instance-prompt", a.instance_prompt, None, _text
                )
            _check_dataset(entry)
            self.datasets.append(entry)

    # -- parsing one answer ---------------------------------------------------------------------------
    def _set(self, key: str, value: str) -> str:
        self.check(**{key: value})
        return value

    def _family(self, value: str) -> str:
        cls = self.host.family_class(value)  # names the plugin to install for a known family
        self.check(model_family=cls.name)
        return cls.name

    def _flavour(self, value: str) -> str:
        self.check(model_flavour=value)
        return value

    def _model_path(self, value: str) -> str:
        local = self._local(value)
        if local.exists():
            if not (local / "model_index.json").is_file() and not (local / "transformer").is_dir():
                raise UserError(f"{value} is not a diffusers pipeline folder (no model_index.json in it).")
        elif not HUB_ID.fullmatch(value):
            raise UserError(f"{value} is neither a folder here nor a Hub id such as org/name.")
        flavours = self.host.families[self.raw["model_family"]].flavours
        if value != flavours.get(str(self.raw.get("model_flavour"))):  # the flavour's own repository goes unsaid
            self.check(pretrained_model_name_or_path=value)
        return value

    def _adapter(self, value: str) -> str:
        if value not in ADAPTERS:
            raise UserError(f"`{value}` is not an adapter; answer one of {', '.join(ADAPTERS)}.")
        if value == "full":
            self.check(model_type="full")
        elif value == "lycoris":
            self.check(model_type="lora", lora_type="lycoris", lycoris_config=str(LYCORIS_FILE))
        else:
            self.check(model_type="lora")
        return value

    def _preset(self, value: str) -> str:
        if value not in LYCORIS_PRESETS:
            raise UserError(f"`{value}` is not a LyCORIS preset; answer one of {', '.join(sorted(LYCORIS_PRESETS))}.")
        self.lycoris = dict(LYCORIS_PRESETS[value]["settings"])
        return value

    def _mixed(self, value: str) -> str:
        return self._set("mixed_precision", value)

    def _resolution(self, value: str) -> str:
        self.check(resolution=value)
        size = float(self.raw["resolution"])
        if size.is_integer() and size >= 16:  # pixels: validation images at the training size
            self.check(validation_resolution=f"{int(size)}x{int(size)}")
        return value

    def _steps(self, value: str) -> str:
        if not value.isdigit() or int(value) < 1:
            raise UserError(f"Training steps must be a whole number above 0, not {value!r}.")
        self.check(max_train_steps=int(value))
        return value

    def _learning_rate(self, value: str) -> str:
        self.check(learning_rate=value)
        return value

    def _validation_prompt(self, value: str) -> str:
        if value.strip():
            self.check(validation_prompt=value.strip())
        return value

    def _folder(self, value: str) -> str:
        local = self._local(value)
        if not local.is_dir():
            raise UserError(f"The folder {value} does not exist; type the path of a folder of images.")
        images, _ = _count_images(local)
        if not images:
            raise UserError(f"{value} holds no images (jpg, png, webp, …); choose the folder that has them.")
        return value

    def _local(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.project / path

    def _dataset_id(self, folder: str) -> str:
        base = re.sub(r"[^\w.-]+", "-", Path(folder).name).strip("-") or "dataset"
        taken = {d["id"] for d in self.datasets}
        name, n = base, 2
        while name in taken:
            name, n = f"{base}-{n}", n + 1
        return name

    # -- writing ---------------------------------------------------------------------------------------
    def write(self) -> int:
        config_path = self.project / CONFIG_FILE
        toml = self.project / "config" / "config.toml"
        if toml.is_file() and not config_path.is_file():
            raise UserError(
                f"This project is configured in {toml}; st-train would read a new config.json instead of it, "
                "so move config.toml away first (or edit it)."
            )
        written, config_text = read_document(config_path, "config file")
        if written is not None and not isinstance(written, dict):
            raise ConfigError(f"The config file {config_path} must hold one JSON object; fix or move it.")
        existing: dict[str, Any] = written or {}
        current = read_config_file(config_path) if written is not None else {}
        datasets_rel = str(current.get("data_backend_config") or DATASETS_FILE)
        datasets_path = self._local(datasets_rel)
        old_sets, datasets_text = read_document(datasets_path, "dataset list")
        keep: list[dict[str, Any]] = []
        if isinstance(old_sets, list) and old_sets and not self.args.replace_datasets:
            new_ids = {d["id"] for d in self.datasets}
            others = [d for d in old_sets if not (isinstance(d, dict) and d.get("id") in new_ids)]
            names = ", ".join(str(d.get("id")) for d in others if isinstance(d, dict))
            if others and self.confirm(f"Keep the {len(others)} other datasets in {datasets_rel} ({names})?", True):
                keep = others
        values = dict(self.raw)
        values["data_backend_config"] = datasets_rel
        self.say("")
        if written is not None and not self.confirm(
            f"{config_path} exists: write these answers into it (its other keys are kept)?", False
        ):
            raise Cancelled(f"{config_path} was left as it is; nothing was written.")
        lycoris_path = self._local(str(values.get("lycoris_config", LYCORIS_FILE)))
        if (
            self.lycoris is not None
            and lycoris_path.is_file()
            and not self.confirm(f"{lycoris_path} exists: replace it with the preset?", False)
        ):
            self.lycoris = None
        aliases = option_names(self.model)
        config = edit_config(
            existing, values, canonical=lambda key: aliases.get(normalise_key(key), normalise_key(key))
        )
        save_json(config_path, config, config_text)
        save_json(datasets_path, [*keep, *self.datasets], datasets_text)
        if self.lycoris is not None:
            save_json(lycoris_path, self.lycoris)
        self.say(f"Wrote {config_path} and {datasets_path}" + (f" and {lycoris_path}" if self.lycoris else "") + ".")
        self.say("Next: `st-train check` shows what the datasets hold; `st-train` trains.")
        return 0


def checked(raw: dict[str, Any], host: PluginHost) -> CoreOptions:
    """``raw`` validated exactly as ``st-train`` validates a config file (session.prepare, without the file)."""
    from stune.checks import check_run

    config = validate_config(raw, host.config_model(), host)
    family_cls = host.family_class(config.model_family)
    config.model_family = family_cls.name
    family = family_cls(config)
    family.apply_defaults()
    features = [feature(config, family) for feature in host.features.values() if feature.enabled(config)]
    check_run(config, family, features, host)
    return config


def _typed(answer: Any, validated: Any) -> Any:
    if isinstance(validated, bool) or not isinstance(validated, int | float):
        return answer
    if isinstance(validated, float) and validated.is_integer() and re.fullmatch(r"\d+", str(answer).strip()):
        return int(validated)
    return validated


def _count_images(folder: Path) -> tuple[int, int]:
    from stune.data.images import list_images

    images = list_images(folder)
    return len(images), sum(1 for p in images if p.with_suffix(".txt").is_file())


def _caption_strategy(value: str, caption_files: int) -> str:
    if value not in CAPTIONS:
        raise UserError(f"`{value}` is not a caption source; answer one of {', '.join(CAPTIONS)}.")
    if value == "textfile" and not caption_files:
        raise UserError("No image here has a caption .txt file beside it; answer filename or instanceprompt.")
    return value


def _text(value: str) -> str:
    if not value.strip():
        raise UserError("An empty caption trains nothing; type the caption.")
    return value.strip()


def _check_dataset(entry: dict[str, Any]) -> None:
    from pydantic import ValidationError

    from stune.config import _one_sentence
    from stune.data.config import DatasetConfig

    try:
        DatasetConfig.model_validate(entry)
    except ValidationError as exc:
        raise ConfigError(f"Dataset `{entry['id']}`: {_one_sentence(exc)}") from None


def run(argv: Sequence[str], out: TextIO) -> int:
    parser = argparse.ArgumentParser(
        prog="st-train configure",
        description="Answer a few questions; write config/config.json and config/multidatabackend.json.",
    )
    parser.add_argument("--plugin", action="append", metavar="NAME", help="load only this plugin (repeatable)")
    add_arguments(parser)
    args = parser.parse_args(argv)
    host = PluginHost.build(args.plugin)
    wizard = Wizard(host, args, None if args.yes else input, out)
    return wizard.run()
