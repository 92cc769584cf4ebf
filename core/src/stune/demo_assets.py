"""What every family's demo model shares: generated pictures, a tiny VAE trained to reconstruct
them, a base transformer that stune itself pre-trains on them, and the pixel statistic that shows
the demo's concept appearing.

A family plugin's ``tiny.py`` builds its tiny random pipeline (its own architecture) and calls
:func:`build_demo_model`, which

1. puts :func:`demo_vae` in place of the pipeline's VAE and trains it on generated coloured shapes
   (an ordinary training loop: reconstruction loss plus a small KL term) until it reconstructs
   held-out shapes at 64 px, and sets its ``scaling_factor``/``shift_factor`` from the latents'
   statistics, as real VAEs are calibrated;
2. fine-tunes the whole transformer with stune (``model_type=full``) on the base pictures: shapes in
   the base colours, never the concept colour :data:`CONCEPT`, whose word no base caption contains;
3. writes ``demo_model.json`` last: a model folder without it (or built by another recipe) is
   built again.

The demo's LoRA (:func:`write_demo_run`) then learns the concept from pictures of :data:`CONCEPT`
shapes under that word; the validation images of the trigger prompt turn towards :data:`CONCEPT`
from the base images on (:func:`concept_distance` measures it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger("stune.demo")

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "purple": (170, 40, 210),
}
SHAPES = ("circle", "square", "triangle")
#: colours of the base pictures (shapes and backgrounds)
BASE_COLOURS = ("red", "green", "blue", "yellow", "white", "black")
#: the colour the base model never sees and the demo LoRA teaches, under its own word
CONCEPT = "purple"
#: pixel size of every demo picture and of the VAE's PSNR
SIZE = 64
MARKER = "demo_model.json"
#: the demo VAE's widths, full resolution first (see :func:`demo_vae`)
VAE_CHANNELS = (16, 16, 32, 32)
#: bumped when the recipe below changes, so that a demo folder built by an older one is rebuilt
RECIPE = 1
#: the demo's validation prompts: the trigger prompt first (the run's ``validation_prompt``), then
#: a picture of the base set, to compare
TRIGGER_PROMPT = f"a {CONCEPT} circle on a white background"
BASE_PROMPT = "a red square on a blue background"


# -- pictures --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Picture:
    colour: str
    shape: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def draw(picture: Picture, size: int, rng: random.Random) -> Image.Image:
    """``picture`` at ``size``×``size`` px: a flat shape, its size and place drawn from ``rng``."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), PALETTE[picture.background])
    pen = ImageDraw.Draw(image)
    r = size * rng.uniform(0.22, 0.32)
    cx, cy = size / 2 + rng.uniform(-0.1, 0.1) * size, size / 2 + rng.uniform(-0.1, 0.1) * size
    fill = PALETTE[picture.colour]
    if picture.shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif picture.shape == "square":
        pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def pictures(colours: Iterable[str], backgrounds: Iterable[str], shapes: Iterable[str] = SHAPES) -> list[Picture]:
    """Every (colour, shape, background) with a background other than the colour."""
    backgrounds, shapes = list(backgrounds), list(shapes)
    return [Picture(c, s, b) for c in colours for s in shapes for b in backgrounds if b != c]


def random_pictures(count: int, colours: Sequence[str], seed: int) -> list[Picture]:
    """``count`` pictures drawn at random: a shape in one of ``colours`` on another of them."""
    rng = random.Random(seed)
    drawn = []
    for _ in range(count):
        colour, background = rng.sample(list(colours), 2)
        drawn.append(Picture(colour, rng.choice(SHAPES), background))
    return drawn


def write_pictures(folder: Path, chosen: Sequence[Picture], size: int = SIZE, seed: int = 0) -> Path:
    """Each picture as ``shape_<i>.png`` with its caption in ``shape_<i>.txt``; returns ``folder``."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, picture in enumerate(chosen):
        draw(picture, size, rng).save(folder / f"shape_{i:03d}.png")
        (folder / f"shape_{i:03d}.txt").write_text(picture.caption + "\n")
    return folder


def pixels(chosen: Sequence[Picture], size: int, seed: int) -> torch.Tensor:
    """The pictures drawn as one ``(N, 3, size, size)`` batch in [-1, 1]."""
    import numpy as np
    import torch

    rng = random.Random(seed)
    arrays = [np.asarray(draw(p, size, rng), dtype=np.float32) for p in chosen]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


# -- the VAE ------------------------------------------------------------------------------------------------


@dataclass
class VaeTraining:
    steps: int
    seconds: float
    psnr_before: float  # dB on the held-out shapes with the random weights
    psnr: float  # dB on the same shapes after training
    scaling_factor: float
    shift_factor: float


def held_out_pixels(count: int = 32) -> torch.Tensor:
    """Shapes the VAE never trains on (their own seed), in every colour including the concept's."""
    return pixels(random_pictures(count, list(PALETTE), seed=10_000), SIZE, seed=10_001)


def reconstruction_psnr(vae: Any, images: torch.Tensor) -> float:
    """PSNR in dB of ``vae``'s reconstructions (posterior mean, decoded) of ``images`` in [-1, 1]."""
    import torch

    was_training = vae.training
    vae.eval()
    try:
        with torch.no_grad():
            decoded = vae.decode(vae.encode(images).latent_dist.mode()).sample.clamp(-1, 1)
    finally:
        vae.train(was_training)
    mse = float(((decoded - images) / 2).pow(2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def demo_vae() -> Any:
    """The demo models' ``AutoencoderKL``, random: 16 latent channels at 1/8 of the size, as every
    family here expects, and small enough to train in a minute on the CPU.

    One normalisation group: with two channels per group (the families' tiny VAEs) a flat colour
    normalises to little more than the signs of channel differences, and the VAE learns colours
    slowly; with one group the colour survives as a direction over all the channels."""
    import torch
    from diffusers import AutoencoderKL

    autoencoder: Any = AutoencoderKL  # diffusers is untyped
    torch.manual_seed(0)
    return autoencoder(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=1,
        sample_size=256,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _crops(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    import torch

    top, left = torch.randint(0, images.shape[-1] - size + 1, (2, len(images)), generator=generator).tolist()
    return torch.stack([im[:, y : y + size, x : x + size] for im, y, x in zip(images, top, left, strict=True)])


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread meanwhile. The demo model's small tensors gain little from a second
    thread, and on a busy machine two threads mostly wait for each other (several times slower);
    the build then also does not depend on the number of cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _vae_steps(
    vae: Any,
    pool: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    schedule: Any,
    steps: int,
    batch_size: int,
    crop: int,
    generator: torch.Generator,
) -> None:
    import torch

    for step in range(steps):
        batch = _crops(pool[torch.randint(len(pool), (batch_size,), generator=generator)], crop, generator)
        posterior = vae.encode(batch).latent_dist
        decoded = vae.decode(posterior.sample(generator)).sample
        loss = torch.nn.functional.mse_loss(decoded, batch) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 200 == 0:
            log.info("demo VAE: step %d of %d, loss %.4f", step + 1, steps, float(loss.detach()))


def train_vae(
    folder: Path,
    steps: int = 800,
    batch_size: int = 16,
    crop: int = 32,
    learning_rate: float = 2e-3,
    seed: int = 0,
) -> VaeTraining:
    """Train the ``AutoencoderKL`` saved in ``folder`` on generated shapes; save it back calibrated.

    It trains on ``crop``-pixel crops of 64-pixel pictures (a quarter of the work per picture; the
    VAE is convolutional, so it reconstructs whole pictures as well) and is measured on whole
    held-out pictures."""
    import torch
    from diffusers import AutoencoderKL

    started = time.perf_counter()
    log.info("demo VAE: training on generated shapes (%d steps) …", steps)
    autoencoder: Any = AutoencoderKL  # diffusers is untyped
    vae = autoencoder.from_pretrained(folder).float()
    held_out = held_out_pixels()
    before = reconstruction_psnr(vae, held_out)
    # A random encoder's log-variance is about 0: its samples would bury the means in unit noise
    # and the decoder could learn nothing for many steps. Start it near zero variance instead;
    # training moves it.
    latent_channels = vae.config.latent_channels
    out = vae.encoder.conv_out
    with torch.no_grad():
        out.weight[latent_channels:].zero_()
        out.bias[latent_channels:].fill_(-8.0)
    generator = torch.Generator().manual_seed(seed)
    pool = pixels(random_pictures(256, list(PALETTE), seed=seed), SIZE, seed=seed + 1)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=learning_rate, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / steps))),
    )
    vae.train()
    with one_thread():
        _vae_steps(vae, pool, optimizer, schedule, steps, batch_size, crop, generator)
    vae.eval()
    # Real VAEs ship the shift and scale that give their latents zero mean and unit variance;
    # the flow-matching noise is unit variance too.
    with torch.no_grad():
        means = vae.encode(pool[:64]).latent_dist.mean
    shift, scale = float(means.mean()), 1.0 / float(means.std())
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    vae.save_pretrained(folder)
    psnr = reconstruction_psnr(vae, held_out)
    result = VaeTraining(steps, time.perf_counter() - started, before, psnr, scale, shift)
    log.info(
        "demo VAE: %.1f dB → %.1f dB PSNR on held-out shapes in %d steps (%.0f s)", before, psnr, steps, result.seconds
    )
    return result


# -- the base transformer -----------------------------------------------------------------------------------


@dataclass
class BaseTraining:
    steps: int
    seconds: float
    pictures: int
    first_loss: float  # mean loss of the first tenth of the steps
    last_loss: float  # mean loss of the last tenth


def base_pictures() -> list[Picture]:
    """The base training set: every shape in every base colour on every other base colour."""
    return pictures(BASE_COLOURS, BASE_COLOURS)


def pretrain_transformer(
    model: Path,
    family: str,
    workdir: Path,
    options: dict[str, Any],
    steps: int = 400,
    seed: int = 0,
) -> BaseTraining:
    """Fine-tune all of ``model``'s transformer with stune on :func:`base_pictures` and put the
    result in ``model/transformer``; the run (config, metrics, report.html) stays in ``workdir``."""
    from stune.adapters import FULL_FOLDER
    from stune.session import prepare
    from stune.train import train

    started = time.perf_counter()
    log.info("demo base transformer: a full fine-tune of %d steps on the base shapes (run in %s) …", steps, workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    chosen = base_pictures()
    data = write_pictures(workdir / "datasets" / "shapes", chosen, seed=seed)
    config = {
        "model_family": family,
        "model_type": "full",
        "pretrained_model_name_or_path": str(model),
        "output_dir": str(workdir / "output"),
        "learning_rate": "1e-3",
        "lr_scheduler": "cosine",
        "lr_warmup_steps": steps // 20,
        "train_batch_size": 8,
        "max_train_steps": steps,
        "mixed_precision": "no",
        "gradient_checkpointing": "false",
        "seed": seed,
        "caption_dropout_probability": 0.1,  # an unconditional prediction for classifier-free guidance
        "checkpoint_step_interval": 0,
        "resume_from_checkpoint": "none",
        "validation_prompt": BASE_PROMPT,
        "validation_step_interval": 0,  # rendered once, at the end
        "validation_resolution": f"{SIZE}x{SIZE}",
        "validation_num_inference_steps": 8,
        "validation_seed": 0,
        "disable_benchmark": True,  # the random transformer draws noise
        **options,
    }
    path = write_config(workdir / "config", config, datasets(workdir, data))
    with one_thread():
        result = train(prepare([family], path, {}))
    shutil.rmtree(model / FULL_FOLDER)
    shutil.copytree(result.output_dir / FULL_FOLDER, model / FULL_FOLDER)
    records = [json.loads(line) for line in (result.output_dir / "metrics.jsonl").read_text().splitlines() if line]
    losses = [float(r["loss"]) for r in records if isinstance(r.get("loss"), int | float)]
    tenth = max(1, len(losses) // 10)
    outcome = BaseTraining(
        steps=result.final_step,
        seconds=time.perf_counter() - started,
        pictures=len(chosen),
        first_loss=sum(losses[:tenth]) / tenth if losses else math.nan,
        last_loss=sum(losses[-tenth:]) / tenth if losses else math.nan,
    )
    log.info(
        "demo base transformer: %d steps on %d pictures, loss %.3f → %.3f (%.0f s)",
        outcome.steps,
        outcome.pictures,
        outcome.first_loss,
        outcome.last_loss,
        outcome.seconds,
    )
    return outcome


# -- the whole demo model -----------------------------------------------------------------------------------


#: vae_steps → a VAE this process trained, and how it went (see :func:`build_demo_model`)
_TRAINED_VAES: dict[int, tuple[Path, VaeTraining]] = {}


def build_demo_model(
    model: Path,
    build_pipeline: Callable[[Path], Any],
    family: str,
    base_options: dict[str, Any],
    *,
    vae_steps: int = 800,
    base_steps: int = 800,
) -> dict[str, Any]:
    """The demo model at ``model``, built once: ``build_pipeline(model)`` saves the family's tiny
    random pipeline there, then its VAE and transformer are trained. Returns what
    ``model/demo_model.json`` records (PSNRs, losses, timings); a complete build by the same
    recipe is reused as it is."""
    marker = model / MARKER
    recipe = {"recipe": RECIPE, "family": family, "vae_steps": vae_steps, "base_steps": base_steps}
    if marker.is_file():
        built: dict[str, Any] = json.loads(marker.read_text())
        if all(built.get(key) == value for key, value in recipe.items()):
            return built
    if model.exists():
        shutil.rmtree(model)  # an unfinished build, or one by another recipe
    build_pipeline(model)
    shutil.rmtree(model / "vae")
    trained = _TRAINED_VAES.get(vae_steps)
    if trained is not None and (trained[0] / "config.json").is_file():
        # Every family's demo VAE is the same, trained by the same seeded recipe: a process that
        # builds several demos (a test session) trains it once.
        shutil.copytree(trained[0], model / "vae")
        vae = trained[1]
    else:
        demo_vae().save_pretrained(model / "vae")
        vae = train_vae(model / "vae", steps=vae_steps)
        _TRAINED_VAES[vae_steps] = (model / "vae", vae)
    base = pretrain_transformer(model, family, model.parent / "base-training", base_options, steps=base_steps)
    built = {**recipe, "concept": CONCEPT, "vae": asdict(vae), "base": asdict(base)}
    marker.write_text(json.dumps(built, indent=2))
    return built


# -- the demo run ---------------------------------------------------------------------------------------------


def concept_pictures() -> list[Picture]:
    """What the demo LoRA learns from: every shape in the concept colour on every base colour."""
    return pictures([CONCEPT], BASE_COLOURS)


def datasets(workdir: Path, data: Path) -> list[dict[str, Any]]:
    """The multidatabackend entries of a run on ``data`` (64 px pictures), caches under ``workdir/cache``."""
    return [
        {
            "id": data.name,
            "type": "local",
            "instance_data_dir": str(data),
            "caption_strategy": "textfile",
            "resolution": SIZE,
            "resolution_type": "pixel_area",
            "minimum_image_size": 0,
            "cache_dir_vae": str(workdir / "cache" / "vae" / data.name),
            "repeats": 0,
        },
        {
            "id": "text-embeds",
            "type": "local",
            "dataset_type": "text_embeds",
            "default": True,
            "cache_dir": str(workdir / "cache" / "text"),
        },
    ]


def write_config(folder: Path, config: dict[str, Any], entries: list[dict[str, Any]]) -> Path:
    """``folder/config.json`` (pointing at ``folder/multidatabackend.json``); returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    backends = folder / "multidatabackend.json"
    backends.write_text(json.dumps(entries, indent=2))
    path = folder / "config.json"
    path.write_text(json.dumps({**config, "data_backend_config": str(backends)}, indent=2))
    return path


def write_demo_run(workdir: Path, model: Path, options: dict[str, Any]) -> Path:
    """The demo LoRA run under ``workdir``: the concept pictures, a prompt library and the config
    (the shared keys, then the family's ``options``); returns the config's path.

    Validation renders the trigger prompt (the run's ``validation_prompt``) and a base prompt,
    on the base model first, then at every ``validation_step_interval``."""
    data = write_pictures(workdir / "datasets" / "concept", concept_pictures())
    config_dir = workdir / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    library = config_dir / "prompt_library.json"
    library.write_text(json.dumps({"base-colours": BASE_PROMPT}, indent=2))
    config = {
        "model_type": "lora",
        "pretrained_model_name_or_path": str(model),
        "output_dir": str(workdir / "output"),
        "lora_rank": 16,
        "learning_rate": "3e-3",
        "train_batch_size": 2,
        "max_train_steps": 200,
        "lr_scheduler": "constant_with_warmup",
        "lr_warmup_steps": 5,
        "mixed_precision": "no",
        "gradient_checkpointing": "false",
        "seed": 42,
        "caption_dropout_probability": 0.1,
        "checkpoint_step_interval": 50,
        "checkpoints_total_limit": 2,
        "validation_prompt": TRIGGER_PROMPT,
        "user_prompt_library": str(library),
        "validation_step_interval": 100,
        "validation_resolution": f"{SIZE}x{SIZE}",
        "validation_num_inference_steps": 8,
        "validation_seed": 0,
        **options,
    }
    return write_config(config_dir, config, datasets(workdir, data))


def concept_distance(image: Image.Image, colour: str = CONCEPT, share: float = 0.1) -> float:
    """How far ``image`` is from showing ``colour``: the mean RGB distance (0 to 441) to it of
    the ``share`` of pixels nearest to it. Low once some region of the picture has the colour;
    blind to where the shape is."""
    import numpy as np

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3)
    distances = np.sort(np.linalg.norm(rgb - np.asarray(PALETTE[colour], dtype=np.float32), axis=1))
    nearest = distances[: max(1, int(len(distances) * share))]
    return float(nearest.mean())


def validation_series(output_dir: Path, nickname: str = "validation") -> list[Path]:
    """The validation images of one prompt of a run, in the order they were rendered: the base
    model's first, then one per validation step (the run's ``validation_prompt`` is ``validation``)."""
    from stune.opts.validation import file_slug

    folder = output_dir / "validation_images"
    base = sorted(folder.glob(f"base-{file_slug(nickname)}-*.png"))
    return base + sorted(folder.glob(f"step-*-{file_slug(nickname)}-*.png"))


def concept_distances(output_dir: Path) -> list[float]:
    """:func:`concept_distance` of each image of the trigger prompt of a demo run, base model first."""
    from PIL import Image

    return [concept_distance(Image.open(path)) for path in validation_series(output_dir)]
