"""`st-train configure` typed at in a pseudo-terminal, as a user would: every answer checked as it is
given, the files it writes pass `st-train check` and train the tiny FLUX model; it never overwrites
a config without asking, keeps the keys it does not ask about, and answers from flags with --yes."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from stune.config import read_config_file
from stune.testing import make_images, offline_env, run_cli


class Terminal:
    """A program on a pseudo-terminal: read what it shows, type answers and Enter."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.master, slave = os.openpty()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stune.cli", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=cwd,
            env=offline_env({"TERM": "dumb"}),
            start_new_session=True,
        )
        os.close(slave)
        self.screen = ""
        self.seen = 0

    def read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.master, 65536)
        except OSError:  # the program ended
            return False
        self.screen += data.decode("utf-8", "replace").replace("\r\n", "\n")
        return bool(data)

    def expect(self, *texts: str, timeout: float = 120) -> str:
        """Wait until one of ``texts`` is shown after what was already read; return that text."""
        deadline = time.monotonic() + timeout
        while True:
            rest = self.screen[self.seen :]
            found = [(rest.find(t), t) for t in texts if t in rest]
            if found:
                position, text = min(found)
                self.seen += position + len(text)
                return text
            assert time.monotonic() < deadline, f"never shown: {texts}\n--- screen ---\n{self.screen}"
            if not self.read(0.5) and self.process.poll() is not None:
                raise AssertionError(f"ended before showing {texts}\n--- screen ---\n{self.screen}")

    def type(self, answer: str) -> None:
        os.write(self.master, (answer + "\r").encode())

    def answer(self, prompt: str, answer: str) -> None:
        self.expect(prompt)
        self.type(answer)

    def wait(self, timeout: float = 120) -> int:
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            self.read(0.2)
            assert time.monotonic() < deadline, self.screen
        while self.read(0.1):
            pass
        os.close(self.master)
        return int(self.process.returncode)


def test_configure_in_a_terminal_writes_a_config_that_checks_and_trains(tmp_path: Path, tiny_flux_dir: Path) -> None:
    project = tmp_path / "project"
    make_images(project / "images", 6, (64, 64))
    t = Terminal(["configure"], project)
    t.answer("Model family", "fluxx")  # a typo: named, and asked again
    t.expect("✗ Unknown model_family `fluxx`")
    t.answer("Model family", "flux")
    t.answer("flux flavour", "dev")
    t.expect("[black-forest-labs/FLUX.1-dev]")  # the flavour's repository is the default
    t.type("/nowhere/model")
    t.expect("✗ /nowhere/model is neither a folder here nor a Hub id")
    t.answer("Base model", str(tiny_flux_dir))
    t.answer("Adapter (lora, lycoris, full) [lora]", "")
    t.answer("LoRA rank [16]", "0")
    t.expect("✗ Option `lora_rank` = '0' is invalid")
    t.answer("LoRA rank", "4")
    t.answer("Mixed precision (bf16, fp16, no) [bf16]", "no")
    if t.expect("Base model quantization", "Dataset 1: folder of images") == "Base model quantization":
        t.type("")  # stune-quant is installed: keep the base model as it is
        t.expect("Dataset 1: folder of images")
    t.type("pictures")
    t.expect("✗ The folder pictures does not exist")
    t.answer("Dataset 1: folder of images", "images")
    t.expect("6 images, 6 with a caption .txt file")
    t.answer("Dataset 1: captions from (textfile, filename, instanceprompt) [textfile]", "")
    t.answer("Add another dataset folder? [y/N]", "")
    t.answer("Training resolution (pixels) [1024]", "64")
    t.answer("Training steps [1000]", "two")
    t.expect("✗ Training steps must be a whole number")
    t.answer("Training steps", "2")
    t.answer("Batch size [1]", "2")
    t.answer("Learning rate", "3e-3")
    t.answer("Validation prompt (empty: no validation images)", "a red circle")
    t.answer("Output folder [output]", "")
    t.expect("Wrote config/config.json and config/multidatabackend.json")
    assert t.wait() == 0, t.screen

    config = read_config_file(project / "config" / "config.json")
    assert config["model_family"] == "flux" and config["model_flavour"] == "dev"
    assert config["pretrained_model_name_or_path"] == str(tiny_flux_dir)
    assert config["lora_rank"] == 4 and config["resolution"] == 64 and config["max_train_steps"] == 2
    assert config["train_batch_size"] == 2 and config["learning_rate"] == 3e-3
    assert config["validation_resolution"] == "64x64" and config["validation_prompt"] == "a red circle"
    datasets = json.loads((project / "config" / "multidatabackend.json").read_text())
    assert datasets == [
        {"id": "images", "type": "local", "instance_data_dir": "images", "caption_strategy": "textfile"}
    ]

    check = run_cli(["check"], cwd=project)
    assert check.returncode == 0, check.stderr
    assert "files found: 6, used: 6" in check.stdout
    # Shorter T5 inputs and 2 sampling steps only make it quicker; the run is the config's own.
    trained = run_cli(
        ["train", "--tokenizer_max_length=32", "--validation_num_inference_steps=2", "--disable_benchmark=true"],
        cwd=project,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    output = project / "output"
    assert (output / "pytorch_lora_weights.safetensors").is_file()
    assert list((output / "validation_images").glob("step-000002-*.png"))
    assert [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()] == [1, 2]

    # -- again: a config exists, so it asks before writing; No leaves it untouched ------------------------
    config_path = project / "config" / "config.json"
    config_path.write_text(
        config_path.read_text().replace('"model_family"', '"tokenizer_max_length": 32,\n  "model_family"')
    )
    before = config_path.read_bytes()
    flags = ["--family", "flux", "--flavour", "dev", "--model", str(tiny_flux_dir), "--adapter", "lycoris"]
    flags += ["--lycoris-preset", "lokr-attention", "--mixed-precision", "no", "--base-precision", "no_change"]
    flags += ["--dataset", "images", "--captions", "textfile", "--resolution", "64", "--steps", "3"]
    flags += ["--batch-size", "2", "--learning-rate", "1e-3", "--validation-prompt", "", "--output-dir", "output"]
    t = Terminal(["configure", *flags], project)
    t.answer("config/config.json exists: write these answers into it (its other keys are kept)? [y/N]", "")
    assert t.wait() == 2 and "nothing was written" in t.screen
    assert config_path.read_bytes() == before
    assert not (project / "config" / "lycoris_config.json").exists()

    # -- for scripts: --yes writes from the flags, keeping the keys it does not ask about -----------------
    scripted = run_cli(["configure", "--yes", *flags], cwd=project)
    assert scripted.returncode == 0, scripted.stderr
    updated = read_config_file(config_path)
    assert updated["tokenizer_max_length"] == 32  # written by hand, kept
    assert updated["lora_type"] == "lycoris" and updated["max_train_steps"] == 3
    assert json.loads((project / "config" / "lycoris_config.json").read_text())["algo"] == "lokr"
    assert run_cli(["check"], cwd=project).returncode == 0
    wrong = run_cli(["configure", "--yes", "--family", "flux", "--dataset", "images", "--lora-rank", "-1"], cwd=project)
    assert wrong.returncode == 2 and "--lora-rank" in wrong.stderr and "Traceback" not in wrong.stderr
