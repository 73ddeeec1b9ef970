"""The `syncd` command: parse arguments, load the config, hand over, map failures to exit codes.

Exit codes: 0 success, 1 failure at run time, 2 bad usage or config. No command prints a
traceback for an expected failure; the message names what is wrong.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from syncd.config import Config, ConfigError, config_warnings, load_config

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CommandError(Exception):
    """A run-time failure with a message for the operator (exit 1)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"syncd: {error}", file=sys.stderr)
        return EXIT_USAGE
    except CommandError as error:
        print(f"syncd: {error}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("syncd: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # a bug or an unforeseen environment problem: say what, not where
        from syncd.logs import get_logger, scrub

        get_logger("syncd.cli").error("unexpected_error", exc_info=True)
        print(f"syncd: unexpected error: {type(error).__name__}: {scrub(str(error))}", file=sys.stderr)
        return EXIT_FAILED


def _parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="syncd", description="Keep a Webex Campaign datastore in step with a CRM.")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(
        name: str, handler: Callable[[argparse.Namespace], int], help: str, config: bool = True
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(handler=handler)
        if config:
            sub.add_argument("-c", "--config", required=True, type=Path, metavar="FILE", help="the TOML config")
        return sub

    command("run", _run, "run the daemon: schedule every sync, notify systemd, drain on SIGTERM, reload on SIGHUP")
    once = command("once", _once, "run the syncs until caught up, then exit (non-zero if any failed)")
    once.add_argument("--sync", action="append", metavar="NAME", help="only this sync (repeatable)")
    once.add_argument("--no-progress", action="store_true", help="no progress bar, even in a terminal")
    check = command("check", _check, "check config, sources, columns, indexes, state db and token file")
    check.add_argument("--quiet", action="store_true", help="print problems only")
    check.add_argument(
        "--config-only",
        action="store_true",
        help="validate the config file alone, connecting to nothing (systemd's ExecReload uses this)",
    )
    status = command("status", _status, "show each sync's state, watermark, last run, backlog and dead letters")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    reconcile = command("reconcile", _reconcile, "push every row whose mapped payload differs from what was last sent")
    reconcile.add_argument("--sync", action="append", metavar="NAME", help="only this sync (repeatable)")
    dead = command("dead-letters", _dead_letters, "inspect and act on records that could not be delivered")
    dead.add_argument("action", choices=("list", "retry", "discard"))
    dead.add_argument("ids", nargs="*", type=int, metavar="ID", help="dead letter ids (default: all open ones)")
    dead.add_argument("--sync", metavar="NAME", help="only this sync's dead letters")
    dead.add_argument("--json", action="store_true", help="machine-readable output (list)")
    dead.add_argument("--all", action="store_true", help="list: include resolved ones")
    reset = command("reset", _reset, "move a sync's watermark: resync from the start, or from VALUE")
    reset.add_argument("--sync", required=True, metavar="NAME")
    reset.add_argument("--to", metavar="VALUE", help="resync rows whose watermark is at or after VALUE")
    reset.add_argument(
        "--keep-digests",
        action="store_true",
        help="only move the watermark; rows whose payload was already acknowledged are not resent",
    )
    command("migrate", _migrate, "upgrade the state database to the current schema")
    demo = command("demo", _demo, "zero-setup demo: a CRM in SQLite, the API simulator, a live sync, a summary", config=False)
    demo.add_argument("--rows", type=int, default=200, help="demo contacts (default 200)")
    demo.add_argument("--dir", type=Path, help="keep the demo's files here (default: a temporary directory)")
    simulate = command("simulate-api", _simulate_api, "the local Add-contacts API simulator", config=False)
    if "simulate-api" in argv:  # its options need aiohttp, which no other command loads
        from syncd.simulator import add_cli_arguments

        add_cli_arguments(simulate)
    return parser


# ---------------------------------------------------------------------------- helpers


def _load(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    from syncd.logs import configure_logging

    configure_logging(config.log.level, config.log.format)
    for warning in config_warnings(args.config, config):
        from syncd.logs import get_logger

        get_logger("syncd.config").warning("config_warning", problem=warning)
    return config


def _selected(config: Config, names: Sequence[str] | None) -> list[str]:
    if not names:
        return [sync.name for sync in config.syncs]
    for name in names:
        config.sync(name)  # raises ConfigError naming the known syncs
    return list(names)


def _open_runtime(config: Config, **kwargs: Any):  # type: ignore[no-untyped-def]
    import sqlalchemy as sa

    from syncd.runtime import Runtime

    try:
        return Runtime.open(config, **kwargs)
    except sa.exc.OperationalError as error:
        from syncd.state import db_error_line

        raise CommandError(f"state database {_safe_url(config.state.url)}: {db_error_line(error)}") from None
    except ValueError as error:
        raise CommandError(str(error)) from None


def _safe_url(url: str) -> str:
    import sqlalchemy as sa

    return sa.make_url(url).render_as_string(hide_password=True)


# ---------------------------------------------------------------------------- commands


def _run(args: argparse.Namespace) -> int:
    from syncd.daemon import run_daemon

    return run_daemon(args.config)


def _once(args: argparse.Namespace) -> int:
    config = _load(args)
    names = _selected(config, args.sync)
    from syncd.cycle import CycleReport
    from syncd.progress import ProgressDisplay

    display = ProgressDisplay.for_terminal(sys.stderr, enabled=not args.no_progress)
    runtime = _open_runtime(config, on_progress=display.update)
    reports = {}
    with runtime:
        runtime.warm_up()
        display.start({name: runtime.runners[name] for name in names})

        def one(name: str) -> None:
            try:
                reports[name] = runtime.runners[name].run_until_caught_up()
            except Exception as error:  # a bug in one sync must not hide the others' results
                from syncd.logs import get_logger, scrub

                get_logger("syncd.cli").error("sync_crashed", sync=name, exc_info=True)
                reports[name] = CycleReport(name, outcome="failing", error=f"{type(error).__name__}: {scrub(str(error))}")

        # One thread per sync: a slow or failing sync does not hold up the others.
        threads = [threading.Thread(target=one, args=(name,), name=f"sync-{name}") for name in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        display.finish()
    failed = False
    for name in names:
        report = reports[name]
        line = (
            f"{name}: {report.outcome}: read {report.rows_read}, sent {report.sent}, "
            f"unchanged {report.unchanged}, dead-lettered {report.dead_lettered}"
        )
        if report.error:
            line += f" ({report.error})"
        print(line)
        failed |= report.outcome not in ("ok", "paused")
    return EXIT_FAILED if failed else EXIT_OK


def _reconcile(args: argparse.Namespace) -> int:
    config = _load(args)
    names = _selected(config, args.sync)
    failed = False
    with _open_runtime(config) as runtime:
        runtime.warm_up()
        for name in names:
            report = runtime.runners[name].reconcile()
            print(
                f"{name}: {report.outcome}: compared {report.rows_read}, sent {report.sent}, "
                f"unchanged {report.unchanged}, dead-lettered {report.dead_lettered}"
                + (f" ({report.error})" if report.error else "")
            )
            failed |= report.outcome not in ("ok", "paused")
    return EXIT_FAILED if failed else EXIT_OK


def _check(args: argparse.Namespace) -> int:
    config = _load(args)
    if args.config_only:
        if not args.quiet:
            print(f"ok       config: {args.config}: {len(config.syncs)} sync(s), {len(config.sources)} source(s)")
        return EXIT_OK
    from syncd.checks import run_checks

    problems = 0
    for line in run_checks(config, args.config):
        if line.severity == "error":
            problems += 1
        if not args.quiet or line.severity != "ok":
            print(f"{line.severity:7}  {line.subject}: {line.message}")
    return EXIT_FAILED if problems else EXIT_OK


def _status(args: argparse.Namespace) -> int:
    config = _load(args)
    from syncd.status import collect_status, render_table

    rows = collect_status(config)
    if args.json:
        sys.stdout.write(orjson.dumps({"syncs": rows}, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(render_table(rows))
    return EXIT_OK


def _dead_letters(args: argparse.Namespace) -> int:
    config = _load(args)
    if args.sync:
        config.sync(args.sync)
    from syncd import dead_letters

    with _open_runtime(config, migrate=True) as runtime:
        if args.action == "list":
            letters = dead_letters.listing(runtime, args.sync, include_resolved=args.all, ids=args.ids)
            if args.json:
                sys.stdout.write(orjson.dumps({"dead_letters": letters}, option=orjson.OPT_INDENT_2).decode() + "\n")
            else:
                sys.stdout.write(dead_letters.render(letters))
            return EXIT_OK
        if args.action == "discard":
            count = dead_letters.discard(runtime, args.sync, args.ids)
            print(f"discarded {count} dead letter(s)")
            return EXIT_OK
        outcome = dead_letters.retry(runtime, args.sync, args.ids)
        print(outcome.summary())
        return EXIT_OK if outcome.ok else EXIT_FAILED


def _reset(args: argparse.Namespace) -> int:
    config = _load(args)
    sync = config.sync(args.sync)
    from syncd.source import SourceError, parse_watermark
    from syncd.state import key_text

    with _open_runtime(config) as runtime:
        reader = runtime.runners[sync.name].reader
        try:
            try:
                cursor = parse_watermark(reader, args.to) if args.to is not None else None
            except ValueError as error:
                raise ConfigError(f"--to {args.to!r}: {error}") from None
            # Forget the digests of exactly the rows that will be re-read, so they are resent.
            forget = None
            if not args.keep_digests:
                forget = () if cursor is None else ([key_text(k) for k in keys] for keys in reader.keys_after(cursor))
            runtime.state.reset(sync.name, cursor, forget=forget)
        except SourceError as error:
            raise CommandError(str(error)) from None
    where = "the start" if args.to is None else args.to
    print(f"{sync.name}: watermark reset to {where}" + ("" if args.keep_digests else "; the rows re-read will be sent again"))
    return EXIT_OK


def _migrate(args: argparse.Namespace) -> int:
    config = _load(args)
    with _open_runtime(config) as runtime:
        current = runtime.state.schema_is_current()
    print(f"state database {_safe_url(config.state.url)} is " + ("up to date" if current else "NOT up to date"))
    return EXIT_OK if current else EXIT_FAILED


def _demo(args: argparse.Namespace) -> int:
    from syncd.demo import run_demo

    return run_demo(rows=args.rows, directory=args.dir)


def _simulate_api(args: argparse.Namespace) -> int:
    from syncd.simulator import run_from_args

    return run_from_args(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
