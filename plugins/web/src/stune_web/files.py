"""The project's files as the page edits them: ``config/config.json``, the dataset list and the
LyCORIS config — the same files ``st-train`` and ``st-train configure`` read and write.

Saving validates with the config loader's own rules (:func:`stune.config.validate_config`, the
dataset list's :class:`stune.data.config.DatasetConfig`) and writes through :mod:`stune.project`:
only the keys the user changed change, every other key keeps its spelling, place and value, and a
key stune does not know (a plugin that is not installed here) is kept, with the reason the CLI
would give shown beside it. A key equal to its default is never pruned.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from stune.config import _one_sentence, normalise_key, validate_config
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

_NAMED = re.compile(r"`([^`]+)`")


class Invalid(ConfigError):
    """A value the loader refuses; ``key`` names the option (or dataset key) when known."""

    def __init__(self, message: str, key: str | None = None, index: int | None = None) -> None:
        super().__init__(message)
        self.key = key
        self.index = index


class ProjectFiles:
    def __init__(self, project: Path, host: PluginHost) -> None:
        self.project = project
        self.host = host
        self.model = host.config_model()
        self.aliases = option_names(self.model)  # accepted key → option name

    def canonical(self, key: str) -> str:
        name = normalise_key(key)
        return self.aliases.get(name, name)

    def local(self, path: str | Path) -> Path:
        path = Path(path).expanduser()
        return path if path.is_absolute() else self.project / path

    # -- config.json -----------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.project / CONFIG_FILE

    def _written_config(self) -> tuple[dict[str, Any], str | None]:
        written, text = read_document(self.config_path, "config file")
        if written is None:
            toml = self.project / "config" / "config.toml"
            if toml.is_file():
                raise ConfigError(
                    f"This project is configured in {toml}; the web interface edits config/config.json, "
                    "so convert it to JSON (or start from a new project folder)."
                )
            return {}, None
        if not isinstance(written, dict):
            raise ConfigError(f"The config file {self.config_path} must hold one JSON object of option: value pairs.")
        return written, text

    def read_config(self) -> dict[str, Any]:
        try:
            written, text = self._written_config()
        except ConfigError as exc:
            return {"path": str(CONFIG_FILE), "exists": self.config_path.exists(), "error": str(exc)}
        values: dict[str, Any] = {}
        unknown: dict[str, str] = {}
        for key, value in written.items():
            name = self.canonical(key)
            if name in self.model.model_fields:
                values[name] = value
            else:
                unknown[key] = self._complaint(normalise_key(key), value)
        problem = self._problem(written)
        return {
            "path": str(CONFIG_FILE),
            "exists": text is not None,
            "written": written,
            "values": values,
            "unknown": unknown,
            "problem": problem,
            "warning": self._warning(written) if text is not None and problem is None else None,
        }

    def save_config(self, changes: dict[str, Any], removed: list[str]) -> dict[str, Any]:
        """Apply the user's changes; refuse (Invalid) what the loader would refuse."""
        written, text = self._written_config()
        for key in changes:
            if self.canonical(key) not in self.model.model_fields:
                raise Invalid(self._complaint(normalise_key(key), changes[key]), key=normalise_key(key))
        config = edit_config(written, changes, removed, canonical=self.canonical)
        problem = self._problem(config)
        if problem is not None:
            raise Invalid(problem["message"], key=problem.get("key"))
        save_json(self.config_path, config, text)
        return self.read_config()

    def _known_part(self, written: dict[str, Any]) -> dict[str, Any]:
        return {normalise_key(k): v for k, v in written.items() if self.canonical(k) in self.model.model_fields}

    def _problem(self, written: dict[str, Any]) -> dict[str, Any] | None:
        """What the loader refuses in the keys it knows — the values, their combinations, the family
        and its own rules (unknown keys are reported one by one)."""
        try:
            self._family(written).check_config()
        except UserError as exc:
            return self._named(exc)
        return None

    def _warning(self, written: dict[str, Any]) -> dict[str, Any] | None:
        """What ``st-train`` would still refuse here (the machine, trackers, quantizers, features):
        shown, not blocking, as the config may be meant for another machine."""
        from stune.checks import check_run

        try:
            family = self._family(written)
            features = [f(family.config, family) for f in self.host.features.values() if f.enabled(family.config)]
            check_run(family.config, family, features, self.host)
        except UserError as exc:
            return self._named(exc)
        return None

    def _family(self, written: dict[str, Any]) -> Any:
        config = validate_config(self._known_part(written), self.model, self.host)
        family_cls = self.host.family_class(config.model_family)
        config.model_family = family_cls.name
        family = family_cls(config)
        family.apply_defaults()
        return family

    def _named(self, exc: Exception) -> dict[str, Any]:
        named = _NAMED.search(str(exc))
        return {"message": str(exc), "key": self.canonical(named.group(1)) if named else None}

    def _complaint(self, key: str, value: Any) -> str:
        from stune.simpletuner import OPTION_ROWS

        try:
            validate_config({key: value}, self.model, self.host)
        except UserError as exc:
            return str(exc)
        row = OPTION_ROWS.get(key)
        if row is not None:  # a SimpleTuner option stune takes in another form, at a value it accepts
            return f"SimpleTuner option, {row.status} in stune: {row.reason.rstrip('.')}."
        return "st-train does not read this key."

    def setting(self, name: str) -> Any:
        """The value of option ``name`` in config.json, else its default."""
        try:
            written, _ = self._written_config()
        except ConfigError:
            written = {}
        for key, value in written.items():
            if self.canonical(key) == name:
                return value
        return self.model.model_fields[name].default

    # -- the dataset list ----------------------------------------------------------------------------
    @property
    def datasets_path(self) -> Path:
        return self.local(str(self.setting("data_backend_config") or DATASETS_FILE))

    def read_datasets(self) -> dict[str, Any]:
        path = self.datasets_path
        try:
            data, text = read_document(path, "dataset list")
        except ConfigError as exc:
            return {"path": self._shown(path), "exists": True, "datasets": [], "error": str(exc)}
        datasets = data if isinstance(data, list) else []
        problems = []
        for index, entry in enumerate(datasets):
            try:
                self._check_dataset(index, entry, [])  # as st-train reads it: unknown keys are problems too
            except Invalid as exc:
                problems.append({"index": index, "key": exc.key, "message": str(exc)})
        return {"path": self._shown(path), "exists": text is not None, "datasets": datasets, "problems": problems}

    def save_datasets(self, datasets: list[Any]) -> dict[str, Any]:
        path = self.datasets_path
        current, text = read_document(path, "dataset list")
        before = current if isinstance(current, list) else []
        ids: list[str] = []
        for index, entry in enumerate(datasets):
            self._check_dataset(index, entry, before)
            ids.append(str(entry["id"]))
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if twice:
            raise Invalid(f"Dataset id `{twice[0]}` appears twice; ids must be unique.", key="id")
        save_json(path, datasets, text)
        return self.read_datasets()

    def _check_dataset(self, index: int, entry: Any, before: list[Any]) -> None:
        from stune.data.config import DatasetConfig

        if not isinstance(entry, dict):
            raise Invalid(f"Entry {index} of the dataset list is not an object of dataset keys.", index=index)
        name = entry.get("id", f"#{index}")
        known = option_names(DatasetConfig)
        # A key st-train does not know is kept where the file had it, never added.
        had = {
            normalise_key(k)
            for old in before
            if isinstance(old, dict) and old.get("id") == entry.get("id")
            for k in old
        }
        raw = {}
        for key, value in entry.items():
            bare = normalise_key(key)
            if bare in known:
                raw[bare] = value
            elif bare not in had:
                import difflib

                close = difflib.get_close_matches(bare, list(known), n=1, cutoff=0.6)
                hint = f"; did you mean `{close[0]}`?" if close else "."
                raise Invalid(f"Dataset `{name}` has an unknown key `{bare}`{hint}", key=bare, index=index)
        try:
            DatasetConfig.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            key = str(first["loc"][0]) if first["loc"] else None
            named = _NAMED.search(str(first["msg"]))
            raise Invalid(
                f"Dataset `{name}`: {_one_sentence(exc)}", key=key or (named.group(1) if named else None), index=index
            ) from None

    # -- the LyCORIS config ------------------------------------------------------------------------
    @property
    def lycoris_path(self) -> Path:
        return self.local(str(self.setting("lycoris_config") or LYCORIS_FILE))

    def read_lycoris(self) -> dict[str, Any]:
        path = self.lycoris_path
        try:
            settings, text = read_document(path, "LyCORIS config")
        except ConfigError as exc:
            return {"path": self._shown(path), "exists": True, "settings": None, "error": str(exc)}
        return {
            "path": self._shown(path),
            "exists": text is not None,
            "settings": settings,
            "presets": LYCORIS_PRESETS,
        }

    def save_lycoris(self, settings: Any, algorithms: list[str], preset_keys: list[str]) -> dict[str, Any]:
        if not isinstance(settings, dict) or not isinstance(settings.get("algo"), str):
            raise Invalid("The LyCORIS config must be a JSON object with at least an `algo`.", key="algo")
        if algorithms and settings["algo"].lower() not in algorithms:
            raise Invalid(
                f"LyCORIS has no algorithm `{settings['algo']}`; choose one of {', '.join(algorithms)}.", key="algo"
            )
        preset = settings.get("apply_preset")
        if preset is not None:
            if not isinstance(preset, dict):
                raise Invalid(
                    "`apply_preset` must be an object (target_module, module_algo_map, …).", key="apply_preset"
                )
            unknown = sorted(set(preset) - set(preset_keys)) if preset_keys else []
            if unknown:
                raise Invalid(
                    f"`apply_preset` has an unknown key `{unknown[0]}`; the keys are {', '.join(preset_keys)}.",
                    key="apply_preset",
                )
        path = self.lycoris_path
        _, text = read_document(path, "LyCORIS config") if path.is_file() else (None, None)
        save_json(path, settings, text)
        return self.read_lycoris()

    def _shown(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.project))
        except ValueError:
            return str(path)


# LyCORIS's algorithms and the keys its `apply_preset` takes (the class attributes stune.adapters
# resets before every run); asked in a child process, as lycoris imports torch.
_LYCORIS_PROBE = """
import json
from lycoris import LycorisNetwork
from lycoris.wrapper import network_module_dict
keys = ["enable_conv", "target_module", "target_name", "module_algo_map", "name_algo_map", "use_fnmatch",
        "exclude_name", "lora_prefix"]
attributes = ["ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP", "NAME_ALGO_MAP",
              "USE_FNMATCH", "TARGET_EXCLUDE_NAME"]
assert all(hasattr(LycorisNetwork, a) for a in attributes), "lycoris changed its preset attributes"
print(json.dumps([sorted(network_module_dict), sorted(keys)]))
"""


def lycoris_vocabulary() -> tuple[list[str], list[str]]:
    """LyCORIS's algorithms and ``apply_preset`` keys, from the installed library ([] when it cannot say)."""
    import subprocess
    import sys

    try:
        proc = subprocess.run(
            [sys.executable, "-c", _LYCORIS_PROBE], capture_output=True, text=True, timeout=300, check=True
        )
        algorithms, keys = json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return [], []  # the run itself still checks the config when it starts
    return list(algorithms), list(keys)
