"""Datasets end to end on the tiny FLUX pipeline: the seeds' dataset lists, bad files, masks, regularisation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import stune
from stune.plugins import PluginHost
from stune.session import prepare
from stune.step import Prediction, StepInputs
from stune.testing import run_cli
from stune.train import train

SEEDS = Path(__file__).with_name("seeds")
SHARED_SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds"


def photo(path: Path, size: tuple[int, int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 255, size=3)
    ramp = np.linspace(0.3, 1, w)[None, :, None] * np.linspace(0.5, 1, h)[:, None, None]
    Image.fromarray((base * ramp).astype("uint8")).save(path)


def seed_run(tmp_path: Path, name: str, model: Path, sizes: dict[str, list[tuple[int, int]]]) -> Path:
    """A run folder using a seed's multidatabackend.json unchanged except for absolute paths."""
    text = (SEEDS / f"multidatabackend-{name}.json").read_text().replace("/home/user/simpletuner/", "")
    datasets = json.loads(text)
    for entry in datasets:
        folder = entry.get("instance_data_dir")
        if folder and not (tmp_path / folder).exists():
            (tmp_path / folder).mkdir(parents=True)
            for i, size in enumerate(sizes[entry["id"]]):
                photo(tmp_path / folder / f"photo_of_thing_{i}.png", size, seed=i)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "multidatabackend.json").write_text(json.dumps(datasets, indent=2))
    (tmp_path / "config" / "config.json").write_text(
        json.dumps(
            {
                "model_family": "flux",
                "pretrained_model_name_or_path": str(model),
                "data_backend_config": "config/multidatabackend.json",
                "output_dir": "output",
                "max_train_steps": 3,
                "train_batch_size": 1,
                "mixed_precision": "no",
                "gradient_checkpointing": "false",
                "tokenizer_max_length": 16,
                "seed": 1,
                "checkpoint_step_interval": 0,
                "validation_step_interval": 0,
            }
        )
    )
    return tmp_path


def test_seed_lists_are_the_seeds() -> None:
    if not SHARED_SEEDS.is_dir():
        pytest.skip("../shared/seeds is not beside this checkout")
    texts = "".join(p.read_text() for p in SHARED_SEEDS.glob("*.txt"))
    for seed in SEEDS.glob("multidatabackend-*.json"):
        assert seed.read_text() in texts, f"{seed.name} no longer matches the seed documents"


@pytest.mark.parametrize(
    "name,sizes",
    [
        (
            "flux",
            {
                "pseudo-camera-10k-flux": [(768, 640), (640, 800), (900, 600)],
                "dreambooth-subject": [(1152, 1024), (1024, 1280)],
            },
        ),
        ("hidream", {"pseudo-camera-10k-hidream": [(1280, 1152)], "dreambooth-subject": [(1024, 1152)]}),
        ("sd3", {"pseudo-camera-10k-sd3": [(1200, 1100), (1100, 1400)]}),
    ],
)
def test_seed_dataset_lists_check_and_train(
    name: str,
    sizes: dict[str, list[tuple[int, int]]],
    tmp_path: Path,
    tiny_flux_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = seed_run(tmp_path, name, tiny_flux_dir, sizes)
    check = run_cli(["check", "--plugin", "flux", "--json"], cwd=run)
    assert check.returncode == 0, check.stderr[-2000:]
    report = {d["id"]: d for d in json.loads(check.stdout)["datasets"]}
    for dataset_id, images in sizes.items():
        assert report[dataset_id]["used"] == len(images)
        assert report[dataset_id]["skipped"] == {}
    if name == "flux":
        assert report["pseudo-camera-10k-flux"]["buckets"] == {"512x512": 3}  # square centre crops
        assert report["pseudo-camera-10k-flux"]["regularisation"] is True
        assert report["dreambooth-subject-512"]["samples_per_epoch"] == 2 * 1001
        assert set(report["dreambooth-subject"]["buckets"]) == {"1088x960", "896x1152"}  # natural aspects
    monkeypatch.chdir(run)
    result = train(prepare(host=PluginHost.build(["flux"])))
    assert result.final_step == 3
    assert (run / "output" / "pytorch_lora_weights.safetensors").is_file()


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))}


def test_bad_and_odd_files_are_skipped_reported_and_never_touched(
    tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    photo(data / "good.png", (96, 64), 0)
    Image.new("RGBA", (64, 64), (255, 0, 0, 128)).save(data / "rgba.png")
    palette = Image.new("P", (64, 80), 3)
    palette.putpalette(list(range(256)) * 3)
    palette.save(data / "palette.png")
    Image.new("L", (64, 64), 90).save(data / "grey.png")
    Image.new("CMYK", (64, 64), (0, 50, 100, 0)).save(data / "cmyk.jpg")
    Image.new("I;16", (64, 64), 30000).save(data / "sixteen.tif")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (96, 64), (0, 200, 0)).save(data / "rotated.jpg", exif=exif)
    (data / "empty.png").write_bytes(b"")
    (data / "notes.jpg").write_text("not an image at all")
    (data / "noise.jpg").write_bytes(np.random.default_rng(0).integers(0, 255, 500, dtype=np.uint8).tobytes())
    full = (data / "good.png").read_bytes()
    (data / "truncated.png").write_bytes(full[: len(full) // 2])
    before = _tree_digest(data)

    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "multidatabackend.json").write_text(
        json.dumps([{"id": "mixed", "instance_data_dir": "data", "resolution": 64, "caption_strategy": "filename"}])
    )
    (tmp_path / "config" / "config.json").write_text(
        json.dumps(
            {
                "pretrained_model_name_or_path": str(tiny_flux_dir),
                "data_backend_config": "config/multidatabackend.json",
                "max_train_steps": 2,
                "train_batch_size": 1,
                "mixed_precision": "no",
                "gradient_checkpointing": "false",
                "tokenizer_max_length": 16,
                "validation_step_interval": 0,
                "checkpoint_step_interval": 0,
            }
        )
    )
    check = run_cli(["check", "--plugin", "flux", "--json"], cwd=tmp_path)
    assert check.returncode == 0, check.stderr[-2000:]
    [checked] = json.loads(check.stdout)["datasets"]
    bad = {Path(f["path"]).name: f for f in checked["skipped_files"]}
    assert set(bad) == {"empty.png", "notes.jpg", "noise.jpg", "truncated.png"}
    assert all(f["reason"] == "unreadable" and f["detail"] for f in bad.values())  # the decoder's own words

    monkeypatch.chdir(tmp_path)
    result = train(prepare(host=PluginHost.build(["flux"])))
    assert result.final_step == 2
    [written] = json.loads((tmp_path / "output" / "dataset_report.json").read_text())["datasets"]
    assert {Path(f["path"]).name for f in written["skipped_files"]} == set(bad)
    assert written["used"] == 7
    assert _tree_digest(data) == before  # nothing in the dataset folder was written, moved or deleted
    assert not [p for p in data.rglob("*") if p.name.startswith(".")]


def _masked_run(tmp_path: Path, model: Path, mask_value: int) -> Path:
    data, masks = tmp_path / "data", tmp_path / "masks"
    data.mkdir()
    masks.mkdir()
    for i in range(2):
        photo(data / f"thing_{i}.png", (64, 64), i)
        mask = Image.new("L", (64, 64), 255)
        mask.paste(mask_value, (0, 0, 32, 64))  # the left half
        mask.save(masks / f"thing_{i}.png")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "multidatabackend.json").write_text(
        json.dumps(
            [
                {"id": "pics", "instance_data_dir": "data", "resolution": 64, "conditioning_data": "pics-masks"},
                {
                    "id": "pics-masks",
                    "dataset_type": "conditioning",
                    "conditioning_type": "mask",
                    "instance_data_dir": "masks",
                    "resolution": 64,
                },
            ]
        )
    )
    (tmp_path / "config" / "config.json").write_text(
        json.dumps(
            {
                "pretrained_model_name_or_path": str(model),
                "data_backend_config": "config/multidatabackend.json",
                "max_train_steps": 1,
                "train_batch_size": 2,
                "mixed_precision": "no",
                "tokenizer_max_length": 16,
                "validation_step_interval": 0,
                "checkpoint_step_interval": 0,
                "caption_dropout_probability": 0,
            }
        )
    )
    return tmp_path


class LossProbe:
    """Records what the default loss sees and the gradient it sends back to the prediction."""

    __name__ = "loss-probe"

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    @stune.hookimpl(wrapper=True)
    def compute_loss(self, prediction: Prediction, inputs: StepInputs) -> Any:
        prediction.velocity.retain_grad()
        loss = yield
        self.calls.append(
            {"prediction": prediction.velocity, "target": inputs.target.detach().clone(), "inputs": inputs}
        )
        return loss


def test_mask_of_zeros_removes_the_region_from_the_loss(
    tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(_masked_run(tmp_path, tiny_flux_dir, mask_value=0))
    probe = LossProbe()
    train(prepare(host=PluginHost.build(["flux"], plugins=[probe])))
    [call] = probe.calls
    weight = call["inputs"].loss_weight
    assert weight.shape == (2, 1, 8, 8)
    assert torch.all(weight[..., :4] == 0) and torch.all(weight[..., 4:] == 1)
    grad = call["prediction"].grad
    assert torch.all(grad[..., :4] == 0)  # the masked half contributes nothing to the loss
    assert grad[..., 4:].abs().sum() > 0


@pytest.mark.parametrize("lora_type", ["standard", "lycoris"])
def test_regularisation_target_is_the_base_model_prediction(
    lora_type: str, tmp_path: Path, tiny_flux_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from diffusers import FluxTransformer2DModel

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        photo(data / f"reg_{i}.png", (64, 64), i)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "multidatabackend.json").write_text(
        json.dumps([{"id": "reg", "instance_data_dir": "data", "resolution": 64, "is_regularisation_data": True}])
    )
    (tmp_path / "config" / "config.json").write_text(
        json.dumps(
            {
                "pretrained_model_name_or_path": str(tiny_flux_dir),
                "data_backend_config": "config/multidatabackend.json",
                "max_train_steps": 2,
                "train_batch_size": 2,
                "learning_rate": 1e-2,
                "mixed_precision": "no",
                "tokenizer_max_length": 16,
                "validation_step_interval": 0,
                "checkpoint_step_interval": 0,
                "lora_type": lora_type,
                "lycoris_config": "config/lycoris.json",
            }
        )
    )
    (tmp_path / "config" / "lycoris.json").write_text(json.dumps({"algo": "lokr", "factor": 4, "full_matrix": True}))
    monkeypatch.chdir(tmp_path)
    probe = LossProbe()
    session = prepare(host=PluginHost.build(["flux"], plugins=[probe]))
    train(session)
    base = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")
    for call in probe.calls:  # the second step runs with an already-trained adapter
        with torch.no_grad():
            expected = session.family.predict(base, call["inputs"]).velocity
        assert torch.allclose(call["target"], expected, atol=1e-5)
        assert not torch.allclose(call["target"], call["inputs"].noise - call["inputs"].latents)
