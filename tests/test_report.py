"""report.html: written at every validation and at the end, rebuilt by `st-train report`, also for a
stopped run; it references only files that exist and shows every validation image and the curves."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from stune.plugins import PluginHost
from stune.session import prepare
from stune.testing import headless_chromium, needs_chromium, offline_env, run_cli
from stune.train import train

from .conftest import TOY_PATH, load_toy
from .test_toy_family import toy_run

SLOW_PLUGIN = str(Path(__file__).with_name("slow_steps.py"))


class Page(HTMLParser):
    """Collects what the report references and shows."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.svgs = 0
        self.polylines = 0
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "img" and values.get("src"):
            self.images.append(values["src"] or "")
        if tag == "a" and values.get("href"):
            self.links.append(values["href"] or "")
        self.svgs += tag == "svg"
        self.polylines += tag == "polyline"

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, toy_model: Path) -> Path:
    run = toy_run(
        tmp_path_factory.mktemp("report"),
        toy_model,
        max_train_steps=4,
        validation_step_interval=2,
        disable_benchmark=False,
        checkpoint_step_interval=0,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run)
        train(prepare(host=PluginHost.build(plugins=[load_toy()], entry_points=False)))
    return run / "output"


def test_the_report_shows_every_validation_image_and_the_curves(finished: Path) -> None:
    report = finished / "report.html"
    page = parse(report)
    images = sorted(p.relative_to(finished).as_posix() for p in (finished / "validation_images").glob("*.png"))
    assert images and sorted(page.images) == images  # every validation image, and only those
    assert all((finished / src).is_file() for src in page.images + page.links)  # nothing dangling
    assert page.svgs >= 4 and page.polylines >= 4  # loss, lr, grad norm, step time
    text = " ".join(page.text)
    assert "finished" in text and "base model" in text and "step 4" in text
    assert "toy" in text and "LoRA rank 16" in text
    run = json.loads((finished / "run.json").read_text())
    assert run["max_steps"] == 4 and run["family"] == "toy"
    metrics = [json.loads(line) for line in (finished / "metrics.jsonl").read_text().splitlines()]
    assert all(r["peak_memory_mb"] > 0 for r in metrics if "loss" in r)


def test_st_train_report_rebuilds_it_from_disk(finished: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    (copy / "report.html").unlink()
    proc = run_cli(["report", str(copy)])
    assert proc.returncode == 0, proc.stderr
    assert parse(copy / "report.html").images
    missing = run_cli(["report", str(tmp_path / "nowhere")])
    assert missing.returncode == 2 and "holds no stune run" in missing.stderr and "Traceback" not in missing.stderr


def test_a_stopped_run_has_a_report_too(tmp_path: Path, toy_model: Path) -> None:
    run = toy_run(tmp_path, toy_model, max_train_steps=50, validation_step_interval=0, checkpoint_step_interval=0)
    proc = subprocess.Popen(
        [sys.executable, "-m", "stune.cli", "--plugin", str(TOY_PATH), "--plugin", SLOW_PLUGIN],
        cwd=run,
        env=offline_env({"STUNE_TEST_STEP_SLEEP": "0.3"}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    metrics = run / "output" / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    text = " ".join(parse(run / "output" / "report.html").text)
    assert "stopped at step" in text


@needs_chromium
def test_the_report_renders_in_a_browser(finished: Path, tmp_path: Path) -> None:
    with headless_chromium(tmp_path / "profile", (1280, 1600)) as driver:
        driver.get((finished / "report.html").as_uri())
        widths: Any = driver.execute_script(
            "return Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)"
        )
        assert widths and all(w > 0 for w in widths), widths  # every image loaded
        shot = tmp_path / "report.png"
        driver.save_screenshot(str(shot))
    from PIL import Image, ImageStat

    with Image.open(shot) as image:
        spread = ImageStat.Stat(image.convert("L")).stddev[0]
    assert spread > 5  # not a blank page
