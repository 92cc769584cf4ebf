"""Plugin discovery: entry points in name order, broken plugins reported by name, registries."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import stune
from stune.errors import PluginLoadError, PluginNotInstalled
from stune.family import ModelFamily
from stune.plugins import PluginHost


def _fake_distribution(root: Path, name: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    dist = root / f"{name.replace('-', '_')}-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (dist / "entry_points.txt").write_text(f"[stune]\n{lines}\n")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(source)


FAMILY_PLUGIN = """
import stune
from stune.family import ModelFamily

class {cls}(ModelFamily):
    name = "{family}"

@stune.hookimpl
def register_families(register):
    register({cls})
"""


@pytest.fixture
def fake_plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    _fake_distribution(
        tmp_path,
        "stune-zeta",
        {"zeta": "zeta_plugin"},
        {"zeta_plugin": FAMILY_PLUGIN.format(cls="Zeta", family="zeta")},
    )
    _fake_distribution(
        tmp_path,
        "stune-alpha",
        {"alpha": "alpha_plugin"},
        {"alpha_plugin": FAMILY_PLUGIN.format(cls="Alpha", family="alpha")},
    )
    _fake_distribution(
        tmp_path, "stune-broken", {"broken": "broken_plugin"}, {"broken_plugin": "import no_such_module_anywhere\n"}
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for mod in ("zeta_plugin", "alpha_plugin", "broken_plugin"):
        sys.modules.pop(mod, None)


def test_entry_points_load_in_name_order(fake_plugins: Path) -> None:
    host = PluginHost.build()
    names = [n for n in host.infos if n in ("alpha", "broken", "zeta")]
    assert names == ["alpha", "broken", "zeta"]
    # The families register in the same (name) order, whatever other plugins are installed.
    assert [f for f in host.families if f in ("alpha", "zeta")] == ["alpha", "zeta"]


def test_broken_plugin_is_listed_with_its_error(fake_plugins: Path) -> None:
    host = PluginHost.build()
    listing = {p["name"]: p for p in host.listing()}
    assert "no_such_module_anywhere" in listing["broken"]["error"]
    assert listing["broken"]["distribution"] == "stune-broken"
    assert listing["alpha"]["provides"] == {"families": ["alpha"]}


def test_selecting_a_broken_plugin_fails_naming_it(fake_plugins: Path) -> None:
    with pytest.raises(PluginLoadError, match=r"`broken` \(stune-broken\) failed to import"):
        PluginHost.build(["broken"])


def test_selection_loads_only_the_named_plugins(fake_plugins: Path) -> None:
    host = PluginHost.build(["zeta"])
    assert set(host.infos) == {"zeta"}
    assert "alpha_plugin" not in sys.modules  # an unselected plugin is not even imported


def test_missing_plugin_names_the_package() -> None:
    # A first-party plugin's package comes from the catalog; any other name is guessed as stune-NAME.
    with pytest.raises(PluginNotInstalled, match="pip install stune-hidream"):
        PluginHost.build(["hidream"], entry_points=False)
    with pytest.raises(PluginNotInstalled, match="pip install stune-nonesuch"):
        PluginHost.build(["nonesuch"])


def test_the_catalog_tells_the_truth_about_installed_plugins() -> None:
    """What catalog.json says a first-party plugin owns is what the installed plugin registers."""
    from stune.options import option_names

    host = PluginHost.build()
    checked = 0
    for name, entry in host.catalog.items():
        if name not in host.infos:
            continue
        checked += 1
        info = host.infos[name]
        assert info.distribution == entry.distribution
        assert sorted(info.provides.get("families", [])) == sorted(entry.families)
        own = {k for plugin, model in host.option_models if plugin == name for k in option_names(model)}
        assert set(entry.options) <= own, f"catalog lists options {set(entry.options) - own} that {name} lacks"
        assert set(entry.neutral) <= set(entry.options)
        assert sorted(info.provides.get("commands", [])) == sorted(entry.commands)
        names = {n for n, cls in host.publishers.items() if cls.name in info.provides.get("publishers", [])}
        assert names == set(entry.publishers)
    assert checked >= 1  # stune-flux at least


def test_missing_family_names_the_package() -> None:
    host = PluginHost.build(entry_points=False)
    with pytest.raises(PluginNotInstalled, match="pip install stune-sd3"):
        host.family_class("sd3")


class _Fam(ModelFamily):
    name = "dup"


def _registers(family: type[ModelFamily], name: str) -> Any:
    class Plugin:
        __name__ = name

        @stune.hookimpl
        def register_families(self, register: Any) -> None:
            register(family)

    return Plugin()


def test_duplicate_family_names_both_plugins() -> None:
    with pytest.raises(PluginLoadError, match="`first` and `second` both register the model family `dup`"):
        PluginHost.build(entry_points=False, plugins=[_registers(_Fam, "first"), _registers(_Fam, "second")])


def test_misspelled_hook_is_reported() -> None:
    class Typo:
        __name__ = "typo"

        @stune.hookimpl
        def register_famlies(self, register: Any) -> None:  # not a hook
            pass

    with pytest.raises(PluginLoadError, match="`typo` implements a hook stune does not have"):
        PluginHost.build(entry_points=False, plugins=[Typo()])


def test_file_plugin(tmp_path: Path) -> None:
    path = tmp_path / "myfamily.py"
    path.write_text(FAMILY_PLUGIN.format(cls="Mine", family="mine"))
    host = PluginHost.build([str(path)])
    assert "mine" in host.families
    assert host.infos["myfamily"].provides == {"families": ["mine"]}


def test_shared_option_declared_identically_is_allowed() -> None:
    from stune.options import Field, Options

    class A(Options):
        shared_thing: int = Field(1, description="x")

    class B(Options):
        shared_thing: int = Field(1, description="x")

    class C(Options):
        shared_thing: str = Field("a", description="x")

    def plugin(name: str, model: type[Options]) -> Any:
        class P:
            __name__ = name

            @stune.hookimpl
            def register_options(self, register: Any) -> None:
                register(model)

        return P()

    host = PluginHost.build(entry_points=False, plugins=[plugin("a", A), plugin("b", B)])
    assert "shared_thing" in host.config_model().model_fields
    host = PluginHost.build(entry_points=False, plugins=[plugin("a", A), plugin("c", C)])
    with pytest.raises(stune.ConfigError, match="both declare the option `shared_thing`"):
        host.config_model()


def test_the_typed_facade_covers_every_lifecycle_hook() -> None:
    """``host.hooks`` has one method per lifecycle hook, taking exactly the hook's arguments."""
    import inspect

    from stune import hookspecs
    from stune.hooks import Hooks

    lifecycle = [
        name
        for name, spec in vars(hookspecs).items()
        if callable(spec) and hasattr(spec, "stune_spec") and not name.startswith("register_")
    ]
    assert "route_tokens" in lifecycle and "on_train_end" in lifecycle
    for name in lifecycle:
        method = getattr(Hooks, name)
        assert list(inspect.signature(method).parameters)[1:] == list(
            inspect.signature(getattr(hookspecs, name)).parameters
        )


def test_validators_of_the_same_name_in_two_plugins_are_refused() -> None:
    """pydantic keeps one validator per method name in the merged config: a clash must not pass silently."""
    from pydantic import field_validator

    from stune.options import Field, Options

    class First(Options):
        first_key: int = Field(1, description="x")

        @field_validator("first_key")
        @classmethod
        def _check(cls, value: int) -> int:
            return value

    class Second(Options):
        second_key: int = Field(1, description="x")

        @field_validator("second_key")
        @classmethod
        def _check(cls, value: int) -> int:
            return value

    def plugin(name: str, model: type[Options]) -> Any:
        class P:
            __name__ = name

            @stune.hookimpl
            def register_options(self, register: Any) -> None:
                register(model)

        return P()

    host = PluginHost.build(entry_points=False, plugins=[plugin("a", First), plugin("b", Second)])
    with pytest.raises(stune.ConfigError, match="both define an option validator named `_check`"):
        host.config_model()
    same = PluginHost.build(entry_points=False, plugins=[plugin("a", First), plugin("c", First)])
    assert "first_key" in same.config_model().model_fields  # one model registered twice is no clash
