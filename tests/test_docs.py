"""The documentation says what the code does: every hook documented with its signature, options
table generated from the code, README commands present."""

from __future__ import annotations

import inspect
from pathlib import Path

from stune import hookspecs
from stune.plugins import PluginHost
from stune.testing import run_cli

ROOT = Path(__file__).resolve().parents[1]


def _hooks() -> list[str]:
    host = PluginHost.build(entry_points=False)
    return sorted(name for name in dir(host.pm.hook) if not name.startswith("_"))


def test_every_hook_is_documented_with_its_signature() -> None:
    doc = (ROOT / "docs" / "plugins.md").read_text()
    for name in _hooks():
        args = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        assert f"`{name}({args})`" in doc, f"docs/plugins.md lacks `{name}({args})`"


def test_every_hook_says_when_it_fires() -> None:
    for name in _hooks():
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert "Fires" in doc or "fires" in doc, name


def test_options_doc_is_generated_from_the_code() -> None:
    generated = run_cli(["options", "--markdown"]).stdout.strip()
    doc = (ROOT / "docs" / "options.md").read_text()
    assert generated in doc, "docs/options.md is stale: regenerate it with `st-train options --markdown`"


def test_readme_shows_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
