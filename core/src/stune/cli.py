"""``st-train``: train, list plugins and options, check a config, run the demo.

The module imports neither torch nor any plugin at import time; ``--help``, ``plugins`` and
``options`` stay fast and keep working when a plugin is broken.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from stune.errors import UserError

if TYPE_CHECKING:
    from stune.data.report import Report
    from stune.session import Session

USAGE = """\
st-train [--plugin NAME ...] [--config PATH] [--key=value ...]
       st-train COMMAND [...]

Train a LoRA on a diffusion transformer. With no command, trains with config/config.json
(SimpleTuner format; JSON or TOML) and any --key=value overrides.

commands:
  train      train (the default)
  plugins    list installed plugins and what each provides (JSON)
  options    list every option with its default and help
  check      check a config and its datasets without training
  configure  answer a few questions; write config/config.json and config/multidatabackend.json
  demo       train a LoRA on a tiny generated model and dataset, on the CPU, in a few minutes
  report     rebuild OUTPUT_DIR/report.html (loss curves, validation images) from what is on disk
  convert    write config/config.json from SimpleTuner's deprecated config/config.env

Run `st-train COMMAND --help` for a command's arguments.
"""

BUILTIN_COMMANDS = ("train", "plugins", "options", "check", "configure", "demo", "report", "convert")


def _plugin_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--plugin",
        action="append",
        metavar="NAME",
        help="load only this plugin (repeatable): an installed name (flux) or a .py file",
    )


def _train_parser(prog: str = "st-train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train with a SimpleTuner-style config; any other --key=value overrides an option.",
    )
    _plugin_argument(parser)
    parser.add_argument("--config", metavar="PATH", help="config file (default: config/config.json or .toml)")
    return parser


def _setup_logging() -> None:
    # Under torchrun / accelerate launch only the first process reports progress; the others warn.
    level = logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # httpx2: the HTTP client huggingface_hub 2 logs every request with; botocore and azure: stune-publish
    for noisy in ("httpx", "httpx2", "urllib3", "filelock", "PIL", "botocore", "azure"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def cmd_train(argv: Sequence[str]) -> int:
    parser = _train_parser("st-train train")
    args, rest = parser.parse_known_args(argv)
    from stune.config import parse_overrides
    from stune.session import prepare

    _setup_logging()  # before the config is read: it says what stune does with SimpleTuner-only keys
    session = prepare(args.plugin, args.config, parse_overrides(list(rest)))
    from stune.launch import relaunch, wants_relaunch

    if wants_relaunch(session.config):  # num_processes > 1: the same command under accelerate launch
        return relaunch(session.config, list(argv))
    from stune.train import train

    result = train(session)
    if result.interrupted is not None:
        print(
            f"st-train: stopped by signal {result.interrupted} at step {result.final_step}; the checkpoint is saved, "
            "run the same command to resume.",
            file=sys.stderr,
        )
        return 128 + result.interrupted
    return 0


def cmd_plugins(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="st-train plugins", description="List installed plugins as JSON.")
    parser.add_argument("--all", action="store_true", help="include the core's built-in hook implementations")
    _plugin_argument(parser)
    args = parser.parse_args(argv)
    from stune.plugins import PluginHost

    host = PluginHost.build(args.plugin)
    print(json.dumps(host.listing(include_defaults=args.all), indent=2))
    return 0


def cmd_options(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="st-train options", description="List every option, its default and help.")
    _plugin_argument(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--markdown", action="store_true", help="a Markdown table per plugin (docs/options.md)")
    parser.add_argument(
        "--simpletuner",
        action="store_true",
        help="what stune does with each SimpleTuner option (docs/simpletuner-compat.md)",
    )
    args = parser.parse_args(argv)
    from stune.config import CoreOptions
    from stune.plugins import PluginHost

    host = PluginHost.build(args.plugin)
    if args.simpletuner:
        from stune.simpletuner import compat_markdown

        print(compat_markdown(host), end="")
        return 0
    groups: list[tuple[str, Any]] = [("core", CoreOptions), *host.option_models]
    rows = []
    for owner, model in groups:
        for name, field in model.model_fields.items():
            rows.append(
                {
                    "option": name,
                    "plugin": owner,
                    "default": field.default if not callable(field.default) else None,
                    "type": _type_name(field.annotation),
                    "help": field.description or "",
                }
            )
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    if args.markdown:
        print(_options_markdown(rows))
        return 0
    current = None
    for row in rows:
        if row["plugin"] != current:
            current = row["plugin"]
            print(f"\n[{current}]")
        print(f"  {row['option']} ({row['type']}, default {row['default']!r})\n      {row['help']}")
    return 0


def _options_markdown(rows: list[dict[str, Any]]) -> str:
    lines = []
    current = None
    for row in rows:
        if row["plugin"] != current:
            current = row["plugin"]
            title = "Core (package `stune`)" if current == "core" else f"Plugin `{current}`"
            lines += ["", f"## {title}", "", "| option | type | default | meaning |", "|---|---|---|---|"]
        default = "—" if row["default"] is None else f"`{json.dumps(row['default'], default=str)}`"
        kind = row["type"].replace("|", "or")
        lines.append(f"| `{row['option']}` | {kind} | {default} | {row['help']} |")
    return "\n".join(lines).lstrip("\n")


def _type_name(annotation: Any) -> str:
    import typing

    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(annotation))
    text = str(annotation) if typing.get_args(annotation) else getattr(annotation, "__name__", str(annotation))
    return text.replace("typing.", "")


def cmd_check(argv: Sequence[str]) -> int:
    parser = _train_parser("st-train check")
    parser.description = "Check the config and its datasets (files, captions, sizes) without loading any model."
    parser.add_argument("--json", action="store_true", help="print the dataset report as JSON")
    parser.add_argument("--quick", action="store_true", help="read image headers only (skip full decoding)")
    args, rest = parser.parse_known_args(argv)
    _setup_logging()
    from stune.config import parse_overrides
    from stune.session import prepare

    session = prepare(args.plugin, args.config, parse_overrides(list(rest)))
    check_session(
        session,
        quick=args.quick,
        show=lambda report: print(json.dumps(report.as_dict(), indent=2) if args.json else report.as_text()),
    )
    if session.config.publishing_config and not args.json:
        from pathlib import Path

        from stune.publishing import build_publishers, remote_folder

        for publisher in build_publishers(session.config.publishing_config, session.host):
            folder = remote_folder(Path(session.config.output_dir), publisher.settings)
            print(f"after training, publishes to {publisher.describe()}: {folder}/")
    return 0


def check_session(session: Session, quick: bool = False, show: Callable[[Report], None] | None = None) -> Report:
    """What `st-train check` does after the configuration is read: scan (and decode) every dataset,
    ``show`` the report, then stop with the first reason it cannot be trained on (the fuzz tests
    call this in one process)."""
    from stune.checks import check_datasets
    from stune.data.report import scan_all, verify_decoding

    report = scan_all(session.config, session.family)
    if not quick:
        verify_decoding(report)  # truncated files only show when decoded
    if show is not None:
        show(report)
    report.check_trainable()
    check_datasets(session.config, session.family, report)
    return report


def cmd_convert(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="st-train convert",
        description="Write the config.json equivalent to a SimpleTuner config.env (read, never executed).",
    )
    parser.add_argument("--config", metavar="PATH", default="config/config.env", help="default: config/config.env")
    parser.add_argument("--output", metavar="PATH", default="config/config.json", help="default: config/config.json")
    _plugin_argument(parser)
    args = parser.parse_args(argv)
    from pathlib import Path

    from stune.configenv import convert
    from stune.plugins import PluginHost

    written = convert(Path(args.config), Path(args.output), PluginHost.build(args.plugin).config_model())
    print(f"wrote {written}; check it with `st-train check --config {written}`")
    return 0


def cmd_configure(argv: Sequence[str]) -> int:
    from stune.configure import run

    return run(argv, sys.stdout)


def cmd_demo(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="st-train demo",
        description="Build a tiny random model of a family and a small generated dataset, then train a LoRA on it.",
    )
    _plugin_argument(parser)
    parser.add_argument("--dir", default="demo", help="where the demo model, data and outputs go (default: demo)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's own)")
    args = parser.parse_args(argv)
    from stune.demo import run_demo

    return run_demo(args.plugin, args.dir, args.steps)


def cmd_report(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="st-train report",
        description="Rebuild OUTPUT_DIR/report.html from the run's files (also for an interrupted run).",
    )
    parser.add_argument("output_dir", nargs="?", help="the run's output folder (default: output_dir of the config)")
    parser.add_argument("--config", metavar="PATH", help="config file whose output_dir to use")
    args = parser.parse_args(argv)
    from pathlib import Path

    folder = args.output_dir
    if folder is None:
        from stune.config import find_config_file, read_config_file

        path = find_config_file(args.config)
        folder = str((read_config_file(path) if path else {}).get("output_dir", "output"))
    output_dir = Path(folder)
    if not (output_dir / "metrics.jsonl").is_file() and not (output_dir / "run.json").is_file():
        raise UserError(f"{output_dir} holds no stune run (no metrics.jsonl or run.json); pass the run's output_dir.")
    from stune.report import write_report

    print(write_report(output_dir))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print("usage: " + USAGE)
        return 0
    command = argv[0] if argv and not argv[0].startswith("-") else "train"
    rest = argv[1:] if argv and not argv[0].startswith("-") else argv
    handlers = {
        "train": cmd_train,
        "plugins": cmd_plugins,
        "options": cmd_options,
        "check": cmd_check,
        "configure": cmd_configure,
        "demo": cmd_demo,
        "report": cmd_report,
        "convert": cmd_convert,
    }
    try:
        if command in handlers:
            return handlers[command](rest)
        return _plugin_command(command, rest)
    except UserError as exc:
        if os.environ.get("STUNE_RAISE_ERRORS"):
            raise
        print(f"st-train: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("st-train: interrupted", file=sys.stderr)
        return 130


def _plugin_command(command: str, argv: Sequence[str]) -> int:
    from stune.plugins import PluginHost

    host = PluginHost.build()
    if command not in host.commands:
        owner = next((e for e in host.catalog.values() if command in e.commands), None)
        if owner is not None:
            from stune.errors import PluginNotInstalled

            raise PluginNotInstalled(
                f"`st-train {command}` comes with the `{owner.name}` plugin; install it with "
                f"`pip install {owner.distribution}`."
            )
        known = ", ".join([*BUILTIN_COMMANDS, *sorted(host.commands)])
        raise UserError(f"Unknown command `{command}`; commands are: {known}.")
    spec = host.commands[command]
    parser = argparse.ArgumentParser(prog=f"st-train {command}", description=spec.help)
    spec.add_arguments(parser)
    return int(spec.run(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
