"""Publishing: options, the model card, the upload file list, and the Hub push up to the network.

The Hub cannot be reached from the test machines: ``push`` is exercised with huggingface_hub's own
offline mode, which refuses at ``create_repo``; the upload itself is not tested here.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
from PIL import Image

from stune.config import CoreOptions, build_config_model, validate_config
from stune.errors import ConfigError, UserError
from stune.family import ModelFamily
from stune.opts.publish import PublishOptions
from stune.plugins import PluginHost
from stune.publish import (
    check_publish,
    files_to_upload,
    finish_run,
    push,
    validation_gallery,
    write_model_card,
)


class CardFamily(ModelFamily):
    """Just enough of a family for a model card: presets and a loading snippet."""

    name = "cardtoy"
    flavours: ClassVar[dict[str, str]] = {"base": "someone/base-model"}
    default_flavour = "base"
    lora_presets: ClassVar[dict[str, tuple[str, ...]]] = {"attention": ("to_q", "to_k", "to_v")}
    default_lora_preset = "attention"

    def loading_example(self, output_dir: Path) -> str:
        return (
            "    from diffusers import DiffusionPipeline\n"
            f"    pipe = DiffusionPipeline.from_pretrained({self.model_path()!r})\n"
            f"    pipe.load_lora_weights({str(output_dir)!r})"
        )


def _model() -> type[CoreOptions]:
    # Until PublishOptions is one of CoreOptions' bases, merge it the way plugin options are merged.
    if issubclass(CoreOptions, PublishOptions):
        return CoreOptions
    return build_config_model([("publish", PublishOptions)])


def _config(tmp_path: Path, **values: Any) -> Any:
    return validate_config({"output_dir": str(tmp_path / "out"), "model_family": "cardtoy", **values}, _model())


def _result(step: int) -> Any:
    return SimpleNamespace(final_step=step, adapter_files=[])


def _images(output_dir: Path, steps: list[int], names: list[str]) -> None:
    folder = output_dir / "validation_images"
    folder.mkdir(parents=True, exist_ok=True)
    for step in steps:
        for name in names:
            Image.new("RGB", (8, 8), (step, 0, 0)).save(folder / f"step-{step:06d}-{name}-64x64.png")


# -- options ------------------------------------------------------------------------------------------


def test_defaults_follow_simpletuner(tmp_path: Path) -> None:
    config = _config(tmp_path)
    assert (config.push_to_hub, config.hub_model_id, config.push_checkpoints_to_hub) == (False, None, False)
    assert (config.model_card_private, config.model_card_safe_for_work, config.model_card_note) == (True, False, None)


def test_push_without_repo_is_one_sentence(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        _config(tmp_path, push_to_hub="true")
    assert str(error.value) == "`push_to_hub` needs `hub_model_id` (the Hub repository, user/name); set it."
    with pytest.raises(ConfigError, match="is not a repository id"):
        _config(tmp_path, push_to_hub="true", hub_model_id="a/b/c")


def test_options_register_through_a_plugin(tmp_path: Path) -> None:
    class Plugin:
        @staticmethod
        def register_options(register: Any) -> None:
            register(PublishOptions)

    import stune

    stune.hookimpl(Plugin.register_options)
    host = PluginHost.build(entry_points=False, plugins=[Plugin])
    config: Any = validate_config({"push_to_hub": "true", "hub_model_id": "me/lora"}, host.config_model(), host)
    assert config.push_to_hub and config.hub_model_id == "me/lora"


def test_check_publish_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_publish(_config(tmp_path))  # nothing to check without push_to_hub
    pushing = _config(tmp_path, push_to_hub=True, hub_model_id="me/lora")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE is set; unset it or turn push_to_hub off"):
        check_publish(pushing)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)
    check_publish(pushing)


# -- model card -----------------------------------------------------------------------------------------


def test_model_card_for_a_hub_base_model(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    datasets = tmp_path / "multidatabackend.json"
    (tmp_path / "images").mkdir()
    datasets.write_text(
        json.dumps(
            [
                {
                    "id": "subject",
                    "instance_data_dir": str(tmp_path / "images"),
                    "caption_strategy": "instanceprompt",
                    "instance_prompt": "sks dog",
                },
                {"id": "style", "instance_data_dir": str(tmp_path / "images"), "caption_strategy": "textfile"},
            ]
        )
    )
    library = tmp_path / "prompts.json"
    library.write_text(json.dumps({"cat nap": "a cat asleep"}))
    config = _config(
        tmp_path,
        data_backend_config=str(datasets),
        validation_prompt="a photo of sks dog | on a beach",
        user_prompt_library=str(library),
        learning_rate="4e-5",
        lr_scheduler="cosine",
        lora_rank="8",
        train_batch_size="2",
        seed="42",
        model_card_note="Trained for a test.",
    )
    family = CardFamily(config)
    output_dir = Path(config.output_dir)
    _images(output_dir, [5, 10], ["validation", "cat_nap"])
    Image.new("RGB", (8, 8)).save(output_dir / "validation_images" / "base-validation-64x64.png")
    (output_dir / "ema").mkdir()
    assert sorted(validation_gallery(output_dir)) == [5, 10]

    path = write_model_card(config, family, output_dir, _result(10))
    assert path == output_dir / "README.md"
    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert data["base_model"] == "someone/base-model"
    assert data["library_name"] == "diffusers"
    assert {"lora", "stune", "cardtoy", "not-for-all-audiences"} <= set(data["tags"])
    assert data["instance_prompt"] == "sks dog"
    assert data["widget"] == [
        {"text": "a cat asleep", "output": {"url": "validation_images/step-000010-cat_nap-64x64.png"}},
        {
            "text": "a photo of sks dog | on a beach",
            "output": {"url": "validation_images/step-000010-validation-64x64.png"},
        },
    ]
    assert "license" not in data  # not known: the base model's own card is not on disk
    text = card.text
    assert text.index("Trained for a test.") < text.index("## Validation images")
    assert "[someone/base-model](https://huggingface.co/someone/base-model)" in text
    assert "- `sks dog`" in text
    assert "| Prompt | Base model | Trained |" in text
    assert "| a cat asleep |  | ![step-000010-cat_nap-64x64](validation_images/step-000010-cat_nap-64x64.png) |" in text
    # the pipe in the prompt does not split the table; the base model's image sits next to the trained one
    assert "| a photo of sks dog \\| on a beach | ![base](validation_images/base-validation-64x64.png) | ![" in text
    assert "2 more from earlier steps are in `validation_images/`" in text
    assert "rank 8, alpha 8, on `to_q`, `to_k`, `to_v`" in text
    assert "An EMA copy of the weights, in the same format, is in `ema/`" in text
    for row in ("| Training steps | 10 |", "| Learning rate | 4e-05 |", "| LR scheduler | cosine", "| Seed | 42 |"):
        assert row in text
    assert "| Batch size | 2 × 1 accumulation" in text
    assert "| Flow shift | 3.0 |" in text
    assert f"pipe.load_lora_weights({str(output_dir)!r})" in text  # not pushed: the local folder
    assert "```python\nfrom diffusers import DiffusionPipeline" in text  # dedented
    options = json.loads((output_dir / "training_config.json").read_text())
    assert options["learning_rate"] == 4e-5 and options["lora_rank"] == 8


def test_model_card_for_a_local_base_model_reads_its_license(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: other\nlicense_name: tiny-license\n---\n# tiny\n")
    config = _config(
        tmp_path,
        pretrained_model_name_or_path=str(base),
        push_to_hub="true",
        hub_model_id="me/my-lora",
        model_card_safe_for_work="true",
        flow_schedule_auto_shift="true",
    )
    output_dir = Path(config.output_dir)
    card = ModelCard.load(write_model_card(config, CardFamily(config), output_dir, _result(3)))
    data = card.data.to_dict()
    assert "base_model" not in data  # a local folder is no Hub id
    assert (data["license"], data["license_name"]) == ("other", "tiny-license")
    assert "not-for-all-audiences" not in data["tags"]
    assert "widget" not in data
    text = card.text
    assert "\n# me/my-lora\n" in text
    assert f"of `{base}` trained with" in text
    assert "pipe.load_lora_weights('me/my-lora')" in text  # pushed: load from the Hub repository
    assert "No validation images were rendered" in text
    assert "| Flow shift | auto (resolution-dependent) |" in text


def test_model_card_for_lycoris_and_full(tmp_path: Path) -> None:
    from huggingface_hub import ModelCard

    config = _config(tmp_path, lora_type="lycoris")
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True)
    (output_dir / "lycoris_config.json").write_text(json.dumps({"algo": "lokr", "factor": 16}))
    card = ModelCard.load(write_model_card(config, CardFamily(config), output_dir, _result(2)))
    assert "lycoris" in card.data.tags and "lora" not in card.data.tags
    assert "LyCORIS network" in card.text and '"algo": "lokr"' in card.text

    config = _config(tmp_path, model_type="full")
    card = ModelCard.load(write_model_card(config, CardFamily(config), output_dir, _result(2)))
    assert not {"lora", "lycoris", "template:sd-lora"} & set(card.data.tags)
    assert "Full fine-tune of the transformer" in card.text


def test_finish_run_writes_the_card_on_the_main_process_only(tmp_path: Path) -> None:
    config = _config(tmp_path)
    output_dir = Path(config.output_dir)
    finish_run(config, CardFamily(config), output_dir, _result(1), is_main=False)
    assert not output_dir.exists()
    finish_run(config, CardFamily(config), output_dir, _result(1), is_main=True)
    assert (output_dir / "README.md").is_file() and (output_dir / "training_config.json").is_file()


# -- Hub upload ---------------------------------------------------------------------------------------------


def _run_folder(output_dir: Path) -> None:
    files = [
        "pytorch_lora_weights.safetensors",
        "README.md",
        "metrics.jsonl",
        "training_config.json",
        "validation_images/step-000010-validation-64x64.png",
        "logs/out-20250101-000000/events.out.tfevents.1.host.1.0",
        "logs/wandb/offline-run-20250101_000000-abc/run-abc.wandb",
        "logs/wandb/latest-run/run-abc.wandb",
        "checkpoint-5/pytorch_lora_weights.safetensors",
        "checkpoint-5/training_state.json",
        ".checkpoint-10.tmp-1234/pytorch_lora_weights.safetensors",
        ".cache/huggingface/upload/README.md.metadata",
    ]
    for name in files:
        path = output_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def test_files_to_upload(tmp_path: Path) -> None:
    _run_folder(tmp_path)
    final = [
        "README.md",
        "logs/out-20250101-000000/events.out.tfevents.1.host.1.0",
        "metrics.jsonl",
        "pytorch_lora_weights.safetensors",
        "training_config.json",
        "validation_images/step-000010-validation-64x64.png",
    ]
    assert files_to_upload(tmp_path, include_checkpoints=False) == final
    with_checkpoints = files_to_upload(tmp_path, include_checkpoints=True)
    assert sorted(set(with_checkpoints) - set(final)) == [
        "checkpoint-5/pytorch_lora_weights.safetensors",
        "checkpoint-5/training_state.json",
    ]


def test_push_offline_fails_with_one_sentence_and_keeps_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # HF_HUB_OFFLINE=1, as huggingface_hub reads it at import (the suite runs with it set anyway).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    config = _config(tmp_path, push_to_hub="true", hub_model_id="me/my-lora")
    output_dir = Path(config.output_dir)
    _run_folder(output_dir)
    before = sorted(p for p in output_dir.rglob("*"))
    with pytest.raises(UserError) as error:
        push(config, output_dir)
    message = str(error.value)
    assert message.startswith("Uploading to the Hub repository me/my-lora failed (")
    assert "offline mode is enabled" in message
    assert f"the files remain in {output_dir}, upload them later with `hf upload me/my-lora {output_dir}" in message
    assert message.endswith("--exclude 'checkpoint-*'`.")
    assert isinstance(error.value.__cause__, OSError)  # huggingface_hub's OfflineModeIsEnabled
    assert sorted(p for p in output_dir.rglob("*")) == before


def test_no_push_without_push_to_hub(tmp_path: Path) -> None:
    assert push(_config(tmp_path), tmp_path) is None
