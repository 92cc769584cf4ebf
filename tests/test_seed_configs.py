"""Every key of the seeds' config.json examples is understood: implemented here, or owned by a
plugin that is named when it is missing. The seeds' configs pass `st-train check` on tiny local models."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from stune.config import validate_config
from stune.errors import PluginNotInstalled
from stune.jsonfile import _strip_trailing_commas
from stune.options import option_names
from stune.plugins import PluginHost
from stune.simpletuner import OPTION_ROWS
from stune.testing import make_images, run_cli

SHARED_SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds"
SEEDS = Path(__file__).with_name("seeds")
PROMPT_LIBRARY_HINTS = ("<token>", "nickname")


def seed_configs() -> list[tuple[str, dict[str, object]]]:
    """Config objects (not dataset lists, LyCORIS configs or prompt libraries) in the seed documents."""
    if SHARED_SEEDS.is_dir():
        texts = {p.name: p.read_text() for p in sorted(SHARED_SEEDS.glob("*.txt"))}
    else:  # the copies kept beside the tests
        texts = {p.name: p.read_text() for p in sorted(SEEDS.glob("config-*.json"))}
    found = []
    for name, text in texts.items():
        blocks = re.findall(r"```json\n(.*?)```", text, re.S) if name.endswith(".txt") else [text]
        for block in blocks:
            body = block.strip()
            if body.startswith('"'):
                body = "{" + body.rstrip(",") + "}"
            data = json.loads(_strip_trailing_commas(body))
            if not isinstance(data, dict) or "algo" in data:
                continue
            if any(hint in key for key in data for hint in PROMPT_LIBRARY_HINTS) or "woman" in data:
                continue
            found.append((name, data))
    return found


def test_seed_config_copies_match_the_seeds() -> None:
    if not SHARED_SEEDS.is_dir():
        pytest.skip("../shared/seeds is not beside this checkout")
    copies = {json.dumps(json.loads(p.read_text()), sort_keys=True) for p in SEEDS.glob("config-*.json")}
    seeds = {json.dumps(data, sort_keys=True) for _, data in seed_configs()}
    assert copies == seeds


def test_every_seed_key_is_known_or_owned_by_a_named_plugin() -> None:
    """A seed key is an option of the installed plugins, a SimpleTuner option stune takes in another
    form (docs/simpletuner-compat.md), or belongs to a first-party plugin that is not installed, and
    then the configuration check names that plugin's package."""
    host = PluginHost.build()
    model = host.config_model()
    known = option_names(model)
    configs = seed_configs()
    assert len(configs) >= 6
    for source, data in configs:
        for key, value in data.items():
            key = key.lstrip("-")
            if key in known:
                continue
            if key in OPTION_ROWS:  # a SimpleTuner option stune takes in another form: the seed's value passes
                validate_config({key: value}, model, host)
                continue
            owner = host.catalog_owner_of_option(key)
            assert owner is not None, f"{source}: `{key}` is neither an option nor owned by a first-party plugin"
            if str(owner.neutral.get(key, object())).lower() == str(value).lower():
                validate_config({key: value}, model, host)  # asks nothing of the missing plugin
                continue
            with pytest.raises(PluginNotInstalled, match=f"pip install {owner.distribution}"):
                validate_config({key: value}, model, host)


def _full_configs() -> dict[str, dict[str, object]]:
    unique: dict[str, dict[str, object]] = {}
    for source, data in seed_configs():
        if "model_family" in data or "model_type" in data:
            unique.setdefault(json.dumps(data, sort_keys=True), {"source": source, **data})
    return {f"{d.pop('source')}-{d.get('model_family', 'model')}": d for d in unique.values()}


FULL = _full_configs()


@pytest.mark.parametrize("name", sorted(FULL))
def test_seed_full_configs_check_or_name_the_plugin(name: str, tmp_path: Path, tiny_flux_dir: Path) -> None:
    data = dict(FULL[name])
    make_images(tmp_path / "datasets" / "pics", 2, size=(64, 64))
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "multidatabackend.json").write_text(
        json.dumps([{"id": "pics", "instance_data_dir": "datasets/pics", "resolution": 64, "minimum_image_size": 0}])
    )
    (tmp_path / "config" / "lycoris_config.json").write_text(json.dumps({"algo": "lokr", "factor": 4}))
    library = tmp_path / "config" / "user_prompt_library.json"
    library.write_text(json.dumps({"subject": "a picture"}))
    data.update(
        {
            "pretrained_model_name_or_path": str(tiny_flux_dir),
            "data_backend_config": "config/multidatabackend.json",
            "output_dir": str(tmp_path / "output"),
        }
    )
    for key in ("pretrained_transformer_model_name_or_path", "pretrained_vae_model_name_or_path"):
        data.pop(key, None)
    if "user_prompt_library" in data or "--user_prompt_library" in data:
        data["user_prompt_library"] = str(library)
        data.pop("--user_prompt_library", None)
    (tmp_path / "config" / "config.json").write_text(json.dumps(data))
    missing = _missing_plugins(data)
    proc = run_cli(["check", "--quick"], cwd=tmp_path)
    assert "Traceback" not in proc.stderr
    if not missing:  # every plugin the config needs is installed: it must pass
        assert proc.returncode == 0, proc.stderr[-2000:]
        return
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert any(f"pip install {dist}" in proc.stderr for dist in missing), (missing, proc.stderr[-2000:])


def _missing_plugins(data: dict[str, object]) -> set[str]:
    """Packages of the first-party plugins a config needs (its family, its keys) that are not installed."""
    host = PluginHost.build()
    known = option_names(host.config_model())
    missing = set()
    family = data.get("model_family", "flux")
    for entry in host.catalog.values():
        if entry.name not in host.infos and family in entry.families:
            missing.add(entry.distribution)
    for key, value in data.items():
        key = key.lstrip("-")
        owner = host.catalog_owner_of_option(key)
        if (
            key not in known
            and owner is not None
            and str(owner.neutral.get(key, object())).lower() != str(value).lower()
        ):
            missing.add(owner.distribution)
    return missing
