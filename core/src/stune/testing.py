"""Helpers and pytest fixtures for testing stune and its plugins (registered as a pytest plugin).

Nothing here downloads anything: runs use local folders and ``HF_HUB_OFFLINE=1``. The module
imports neither torch nor any plugin, so loading it into every pytest session is free.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

Run = Callable[..., "subprocess.CompletedProcess[str]"]


def offline_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def run_cli(
    args: Sequence[str], cwd: Path | None = None, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run ``st-train ARGS`` in a subprocess (offline), capturing output."""
    return subprocess.run(
        [sys.executable, "-m", "stune.cli", *args],
        cwd=cwd,
        env=offline_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_run(folder: Path, config: dict[str, Any], datasets: list[dict[str, Any]]) -> Path:
    """A SimpleTuner-style run folder: ``config/config.json`` and ``config/multidatabackend.json``."""
    config_dir = folder / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "multidatabackend.json").write_text(json.dumps(datasets, indent=2))
    config = {"data_backend_config": "config/multidatabackend.json", **config}
    path = config_dir / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def make_images(folder: Path, count: int, size: tuple[int, int] = (64, 64), captions: bool = True) -> list[Path]:
    """Solid-colour gradient PNGs with caption files (``image_003.png`` + ``image_003.txt``)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(count)
    for i in range(count):
        w, h = size
        base = rng.integers(0, 255, size=3)
        ramp = np.linspace(0, 1, w)[None, :, None]
        pixels = (base[None, None, :] * (0.5 + 0.5 * ramp)).repeat(h, axis=0).astype("uint8")
        path = folder / f"image_{i:03d}.png"
        Image.fromarray(pixels).save(path)
        if captions:
            path.with_suffix(".txt").write_text(f"a picture number {i}\n")
        paths.append(path)
    return paths


def venv_with_only(root: Path, distributions: Sequence[Path]) -> Path:
    """A fresh virtual environment in which only the given stune distributions (folders such as
    ``core`` and ``plugins/sd3``) are installed, editable and without dependencies; the running
    environment's other packages (torch, diffusers, …) are shared through a path file, so nothing
    is downloaded. Returns the environment's ``python``. Proves a plugin works without its siblings."""
    import sysconfig
    import venv

    venv.create(root, with_pip=False)
    python = root / "bin" / "python"
    purelib = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    shared = root / "shared-site-packages"
    shared.mkdir()
    ours = Path(sysconfig.get_paths()["purelib"])
    for entry in ours.iterdir():
        name = entry.name.lower()
        if name.startswith(("stune", "__editable__.stune")) or name.endswith(".pth"):
            continue  # no stune distribution leaks in
        (shared / entry.name).symlink_to(entry)
    (purelib / "zz-shared.pth").write_text(f"{shared}\n")
    # This environment's pip and setuptools install into the new one's prefix.
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--ignore-installed"]
    pip += ["--prefix", str(root)]  # --ignore-installed: never uninstall them from this environment
    for folder in distributions:
        subprocess.run([*pip, "-e", str(folder)], check=True, env=offline_env({"PIP_DISABLE_PIP_VERSION_CHECK": "1"}))
    # pip wrote this environment's interpreter into the new scripts (st-train); point them home.
    for script in (root / "bin").iterdir():
        if script.is_file() and not script.is_symlink():
            head = script.read_bytes()[:256]
            if head.startswith(f"#!{sys.executable}".encode()):
                script.write_bytes(
                    script.read_bytes().replace(f"#!{sys.executable}".encode(), f"#!{python}".encode(), 1)
                )
    return python


def step_inputs(noisy_latents: Any, sigmas: Any, embeds: dict[str, Any], **fields: Any) -> Any:
    """:class:`stune.step.StepInputs` for calling a family's ``predict`` directly: the given noisy
    latents at ``sigmas`` (clean latents and noise zero unless given in ``fields``)."""
    import torch

    from stune.step import StepInputs

    zeros = torch.zeros_like(noisy_latents, dtype=torch.float32)
    values: dict[str, Any] = {
        "latents": zeros,
        "noise": zeros,
        "target": zeros,
        "generator": torch.Generator(noisy_latents.device).manual_seed(0),
        **fields,
    }
    return StepInputs(noisy_latents=noisy_latents, sigmas=sigmas, embeds=embeds, **values)


def train_by_phases(folder: Path, host: Any, after_build: Callable[[Any], None] | None = None) -> Any:
    """Train the run of ``folder`` (its config/config.json) in this process, phase by phase as
    ``stune.train.train`` does, calling ``after_build(run)`` once the model is built; return the run."""
    from stune.resume import resume
    from stune.run import setup
    from stune.session import prepare
    from stune.train import build_model, continue_init_lora, export, load_data, loop

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        run = setup(prepare(host=host))
        load_data(run)
        build_model(run)
        if after_build is not None:
            after_build(run)
        continue_init_lora(run)
        resume(run)
        loop(run)
        export(run)
    return run


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
#: Browser tests run in Debian's chromium through selenium; `make test` installs both where it can.
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="Debian's chromium and chromium-driver are not installed (make test does it)",
)


@contextlib.contextmanager
def headless_chromium(profile: Path, size: tuple[int, int] = (1280, 900)) -> Iterator[Any]:
    """A selenium driver of a headless chromium with a fresh profile folder, quit on exit."""
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        f"--user-data-dir={profile}",
        f"--window-size={size[0]},{size[1]}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.implicitly_wait(0)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def stune_cli() -> Run:
    """``stune_cli(args, cwd=...)`` runs ``st-train`` offline in a subprocess."""
    return run_cli


@pytest.fixture(autouse=True)
def _stune_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def check_demo_vae(model: Path, label: str) -> None:
    """A family's demo model (built by ``stune.demo_assets``): its VAE reconstructs held-out shapes
    (≥ 20 dB PSNR at 64 px, far above the random-weight VAE) and its base pre-training lowered the loss."""
    from diffusers import AutoencoderKL

    from stune import demo_assets

    built = json.loads((model / demo_assets.MARKER).read_text())
    vae = AutoencoderKL.from_pretrained(model / "vae")  # type: ignore[no-untyped-call]
    psnr = demo_assets.reconstruction_psnr(vae, demo_assets.held_out_pixels())
    print(f"{label} demo VAE: {built['vae']['psnr_before']:.1f} dB with random weights, {psnr:.1f} dB trained")
    assert psnr >= 20.0
    assert built["vae"]["psnr_before"] < 12.0
    assert built["base"]["last_loss"] < built["base"]["first_loss"]


def check_demo_lora(model: Path, plugin: str, tmp_path: Path, label: str) -> None:
    """`st-train demo --plugin PLUGIN` on a copy of the built demo model: the model is reused, the final
    message points at the report, and the trigger prompt's last validation image is much closer to the
    demo's concept colour than the base image."""
    import shutil

    from stune import demo_assets

    workdir = tmp_path / "demo"
    shutil.copytree(model, workdir / "model")
    proc = run_cli(["demo", "--plugin", plugin, "--dir", str(workdir)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = workdir / "output"
    assert f"stune demo finished: 200 steps of a {plugin} LoRA" in proc.stdout
    assert f"report:            {out / 'report.html'}" in proc.stdout
    assert not (workdir / "base-training").exists()  # the model in the folder was reused
    distances = demo_assets.concept_distances(out)
    print(f"{label} demo: distance to", demo_assets.CONCEPT, "base → steps:", [round(d, 1) for d in distances])
    assert len(distances) == 3
    assert distances[-1] < 0.6 * distances[0]
