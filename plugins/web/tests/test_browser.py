"""The page in Debian's chromium (selenium): fill the form for the tiny FLUX model, add the dataset and
check it, start the run, see the loss curve and a validation image appear, stop it, browse the outputs.

With STUNE_WEB_SCREENSHOTS=FOLDER the pages are saved there as PNGs (docs/images comes from here).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stune.testing import headless_chromium, needs_chromium

from .conftest import stop_children

SHOTS = os.environ.get("STUNE_WEB_SCREENSHOTS")

pytestmark = needs_chromium


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    with headless_chromium(tmp_path / "profile") as driver:
        yield driver


def wait_for(condition: Callable[[], Any], timeout: float = 180, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except Exception:  # an element not there yet
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def screenshot(driver: Any, name: str, height: int | None = None) -> None:
    if not SHOTS:
        return
    from PIL import Image

    folder = Path(SHOTS)
    folder.mkdir(parents=True, exist_ok=True)
    if height:
        driver.set_window_size(1280, height)
        time.sleep(0.5)
    path = folder / f"{name}.png"
    driver.save_screenshot(str(path))
    with Image.open(path) as image:  # small files: a palette is plenty for a UI
        image.convert("RGB").quantize(colors=128).save(path, optimize=True)
    driver.set_window_size(1280, 900)


def test_fill_the_form_start_watch_and_stop_a_run_in_the_browser(
    browser: Any, tmp_path: Path, tiny_flux_dir: Path, shared: dict[str, Path], start_server: Any
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    project = tmp_path / "project"
    project.mkdir()
    server = start_server(project)
    driver = browser
    find = driver.find_element

    def set_option(key: str, value: str, root: str = "#page-configure") -> None:
        if root == "#page-configure" and key not in ("model_family", "model_flavour", "pretrained_model_name_or_path"):
            search = find(By.ID, "option-filter")
            search.clear()
            search.send_keys(key)
        field = find(By.CSS_SELECTOR, f"{root} .field[data-key='{key}']")
        control = field.find_element(By.CSS_SELECTOR, "input, select")
        if control.tag_name == "select":
            Select(control).select_by_value(value)
        else:
            control.send_keys(Keys.CONTROL, "a")
            control.send_keys(value)

    try:
        driver.get(server.url)
        wait_for(lambda: driver.execute_script("return document.body.dataset.ready") == "true", 60, "the page")

        # -- configure: family and flavour first, then the options the run needs -------------------------
        set_option("model_family", "flux")
        set_option("model_flavour", "dev")
        set_option("pretrained_model_name_or_path", str(tiny_flux_dir))
        for key, value in {
            "cache_dir": str(shared["cache"]),
            "resolution": "64",
            "train_batch_size": "2",
            "learning_rate": "3e-3",
            "mixed_precision": "no",
            "gradient_checkpointing": "false",
            "tokenizer_max_length": "32",
            "max_train_steps": "400",
            "checkpoint_step_interval": "0",
            "disable_benchmark": "true",
            "validation_prompt": "a red circle on a blue background",
            "validation_step_interval": "3",
            "validation_num_inference_steps": "2",
            "validation_resolution": "64x64",
        }.items():
            set_option(key, value)
        find(By.ID, "option-filter").clear()
        find(By.ID, "option-filter").send_keys(" ")
        find(By.ID, "only-set").click()  # show what will be written
        find(By.ID, "config-save").click()
        wait_for(lambda: "Saved config/config.json" in find(By.ID, "config-status").text, 30, "the config saved")
        find(By.ID, "option-filter").clear()
        driver.execute_script("window.scrollTo(0, 0)")
        screenshot(driver, "configure")
        config = (project / "config" / "config.json").read_text()
        assert '"max_train_steps": 400' in config and '"mixed_precision": "no"' in config

        # -- the dataset list, and st-train check from the page ------------------------------------------
        driver.get(server.url + "/#datasets")
        wait_for(lambda: driver.execute_script("return document.body.dataset.ready") == "true", 60, "the page")
        find(By.ID, "dataset-add").click()
        set_option("instance_data_dir", str(shared["images"]), root="#page-datasets")
        set_option("id", "pictures", root="#page-datasets")
        find(By.ID, "datasets-check").click()
        wait_for(lambda: "ready to train" in find(By.ID, "datasets-status").text, 120, "st-train check")
        report = find(By.ID, "check-report").text
        assert "files found" in report and "64x64: 8" in report
        screenshot(driver, "datasets", height=1000)

        # -- the run: start, watch the loss curve and a validation image appear, stop ----------------------
        find(By.CSS_SELECTOR, "a[data-tab=run]").click()
        wait_for(lambda: find(By.ID, "run-start").is_enabled(), 30, "the start button")
        find(By.ID, "run-start").click()
        wait_for(lambda: find(By.CSS_SELECTOR, "#run-charts svg[aria-label=loss] polyline"), 240, "the loss curve")
        image = wait_for(lambda: find(By.CSS_SELECTOR, "#run-images figure img"), 240, "a validation image")
        wait_for(lambda: driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image), 30)
        assert "step" in find(By.CSS_SELECTOR, "#run-images figcaption").text
        facts = find(By.ID, "progress-facts").text
        assert "/ 400" in facts and "it/s" in facts
        assert "training 400 steps from step 0" in find(By.ID, "run-log").text
        screenshot(driver, "run", height=1200)
        find(By.ID, "run-stop").click()
        wait_for(lambda: "stopped" in find(By.ID, "run-pill").text, 180, "the run to stop")
        assert "exit 130" in find(By.ID, "run-status").text
        checkpoints = list((project / "output").glob("checkpoint-*"))
        assert len(checkpoints) == 1 and (checkpoints[0] / "checkpoint_complete.json").is_file()

        # -- outputs: the checkpoint and the validation images of the run ---------------------------------
        find(By.CSS_SELECTOR, "a[data-tab=outputs]").click()
        wait_for(lambda: checkpoints[0].name in find(By.ID, "outputs-body").text, 30, "the outputs")
        assert find(By.CSS_SELECTOR, "#outputs-body .grid img")
        screenshot(driver, "outputs", height=1000)
        find(By.CSS_SELECTOR, "a[data-tab=compare]").click()
        wait_for(lambda: find(By.CSS_SELECTOR, "#compare-chart svg polyline"), 30, "the comparison chart")
    finally:
        stop_children(project)
