"""The `syncd` command: parse arguments, load the config, hand over, map failures to exit codes.

Exit codes: 0 success, 1 failure at run time, 2 bad usage or config; `status` adds 3 for a
sync that fails. No command prints a traceback for an expected failure; the message names
what is wrong. A token_file or password_file a command needs is read before it starts, so
a missing one is one line naming its config key (exit 1), whatever the command.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

from syncd.config import Config, ConfigError, config_warnings, load_config, read_secret_file
from syncd.errors import SyncdError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class CommandError(SyncdError):
    """A run-time failure with a message for the operator (exit 1)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except ConfigError as error:
        print(f"syncd: {error}", file=sys.stderr)
        return EXIT_USAGE
    except SyncdError as error:  # raised on purpose: the message is the operator's (errors.py)
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
    parser.add_argument("--version", action=_PrintVersion)
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
    check = command(
        "check", _check, "check config, sources, columns, indexes, state db, token file, and probe the API"
    )
    check.add_argument("--quiet", action="store_true", help="print problems only")
    check.add_argument(
        "--config-only",
        action="store_true",
        help="validate the config file alone, connecting to nothing (systemd's ExecReload uses this)",
    )
    status = command(
        "status",
        _status,
        "show each sync's state, watermark, last run, backlog and dead letters "
        "(exit 0 healthy, 3 when a sync fails, 1 when the state cannot be read)",
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    reconcile = command("reconcile", _reconcile, "push every row whose mapped payload differs from what was last sent")
    reconcile.add_argument("--sync", action="append", metavar="NAME", help="only this sync (repeatable)")
    dead = command("dead-letters", _dead_letters, "inspect and act on records that could not be delivered")
    dead.add_argument("action", choices=("list", "retry", "discard"))
    dead.add_argument(
        "ids", nargs="*", type=int, metavar="ID", help="dead letter ids (list, retry: default all open ones)"
    )
    dead.add_argument("--sync", metavar="NAME", help="only this sync's dead letters")
    dead.add_argument("--json", action="store_true", help="machine-readable output (list)")
    dead.add_argument(
        "--all", action="store_true", help="list: include resolved ones; discard: every open one (of --sync)"
    )
    reset = command("reset", _reset, "move a sync's watermark: resync from the start, or from VALUE")
    reset.add_argument("--sync", required=True, metavar="NAME")
    reset.add_argument("--to", metavar="VALUE", help="resync rows whose watermark is at or after VALUE")
    reset.add_argument(
        "--keep-digests",
        action="store_true",
        help="only move the watermark; rows whose payload was already acknowledged are not resent",
    )
    reset.add_argument("--force", action="store_true", help="reset even while another syncd holds the sync's lease")
    command("migrate", _migrate, "upgrade the state database to the current schema")
    preview = command(
        "preview",
        _preview,
        "read and map rows of a sync's model: what would be sent, what is unchanged, what is rejected; "
        "sends nothing, changes nothing",
    )
    preview.add_argument("--sync", required=True, metavar="NAME")
    preview.add_argument("--limit", type=_positive, default=20, metavar="N", help="rows to read (default 20)")
    preview.add_argument("--key", action="append", metavar="K", help="these keys instead (repeatable)")
    preview.add_argument("--json", action="store_true", help="machine-readable output")
    inspect = command("inspect", _inspect, "one contact's story: source row, mapped record, last ACK, dead letters")
    inspect.add_argument("--sync", required=True, metavar="NAME")
    inspect.add_argument("key", metavar="KEY")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    pushes = command("pushes", _pushes, "the push records (codes, trans_id), newest first")
    pushes.add_argument("--sync", metavar="NAME", help="only this sync's pushes")
    pushes.add_argument(
        "--since", type=_since, metavar="T", help="ISO 8601 time (UTC unless it has an offset) or a duration: 1h, 30m"
    )
    pushes.add_argument("--failed", action="store_true", help="only pushes the API did not acknowledge")
    pushes.add_argument("--limit", type=_positive, default=50, metavar="N", help="at most N (default 50)")
    pushes.add_argument("--json", action="store_true", help="machine-readable output")
    demo = command(
        "demo", _demo, "zero-setup demo: a CRM in SQLite, the API simulator, a live sync, a summary", config=False
    )
    demo.add_argument("--rows", type=int, default=200, help="demo contacts (default 200)")
    demo.add_argument(
        "--dir",
        type=Path,
        help="keep the demo's files here (default ./syncd-demo); must be empty, new, or an earlier demo's",
    )
    simulate = command("simulate-api", _simulate_api, "the local Add-contacts API simulator", config=False)
    if "simulate-api" in argv:  # its options need aiohttp, which no other command loads
        from syncd.simulator import add_cli_arguments

        add_cli_arguments(simulate)
    return parser


class _PrintVersion(argparse.Action):
    """`--version`, reading the installed metadata only when asked (it costs every command otherwise)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.update(dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, help="print the version and exit")
        super().__init__(option_strings, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(f"syncd {_version()}")
        parser.exit()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("syncd")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _since(text: str) -> datetime:
    """`--since`: an ISO 8601 time (naive = UTC, as status shows times) or a duration back from now."""
    from datetime import UTC

    from pydantic import TypeAdapter, ValidationError

    from syncd.config import Duration

    try:
        value = datetime.fromisoformat(text)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except ValueError:
        pass
    try:
        return datetime.now(UTC) - TypeAdapter(Duration).validate_python(text)
    except ValidationError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an ISO 8601 time nor a duration (1h, 30m)") from None


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


def _require_secrets(config: Config, syncs: Sequence[str] | None = None, *, api: bool = True) -> None:
    """Read the secret files a command will need, before it starts: a missing one is one line naming its key.

    `syncs` limits the sources checked to theirs (None: every source).
    """
    sources = set(config.sources) if syncs is None else {config.sync(name).source for name in syncs}
    for name in sorted(sources):
        path = config.sources[name].password_file
        if path is not None:
            read_secret_file(path, f"sources.{name}.password_file")
    if api and config.api.token_file is not None:
        read_secret_file(config.api.token_file, "api.token_file")


def _open_runtime(config: Config, **kwargs: Any):  # type: ignore[no-untyped-def]
    from syncd.errors import StateError
    from syncd.runtime import Runtime

    try:
        return Runtime.open(config, **kwargs)
    except StateError as error:
        raise CommandError(f"state database {config.state.display_url()}: {error.reason}") from None


def _existing_state(config: Config):  # type: ignore[no-untyped-def]
    """The state database for a command that only reads it: never created, never migrated."""
    from syncd.status import StateUnavailable, open_existing_state

    try:
        return open_existing_state(config)
    except StateUnavailable as error:
        raise CommandError(str(error)) from None


def _print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2, default=str).decode() + "\n")


# ---------------------------------------------------------------------------- commands


def _run(args: argparse.Namespace) -> int:
    from syncd.daemon import run_daemon

    _require_secrets(load_config(args.config))
    return run_daemon(args.config)


def _once(args: argparse.Namespace) -> int:
    config = _load(args)
    names = _selected(config, args.sync)
    _require_secrets(config, names)
    from syncd.cycle import CycleReport
    from syncd.progress import ProgressDisplay
    from syncd.values import CycleOutcome

    display = ProgressDisplay.for_terminal(sys.stderr, enabled=not args.no_progress)
    runtime = _open_runtime(config, on_progress=display.update)
    reports = {}
    with runtime:
        runtime.warm_up()

        def one(name: str) -> None:
            try:
                reports[name] = runtime.runners[name].run_until_caught_up()
            except Exception as error:  # a bug in one sync must not hide the others' results
                from syncd.logs import get_logger, scrub

                get_logger("syncd.cli").error("sync_crashed", sync=name, exc_info=True)
                reports[name] = CycleReport(name, outcome=CycleOutcome.FAILING, error=f"{type(error).__name__}: {scrub(str(error))}")

        with display.showing({name: runtime.runners[name] for name in names}):
            # One thread per sync: a slow or failing sync does not hold up the others.
            threads = [threading.Thread(target=one, args=(name,), name=f"sync-{name}") for name in names]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
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
        failed |= report.outcome not in (CycleOutcome.OK, CycleOutcome.PAUSED)
    return EXIT_FAILED if failed else EXIT_OK


def _reconcile(args: argparse.Namespace) -> int:
    from syncd.values import CycleOutcome

    config = _load(args)
    names = _selected(config, args.sync)
    _require_secrets(config, names)
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
            failed |= report.outcome not in (CycleOutcome.OK, CycleOutcome.PAUSED)
    return EXIT_FAILED if failed else EXIT_OK


def _check(args: argparse.Namespace) -> int:
    config = _load(args)
    if args.config_only:
        if not args.quiet:
            print(f"ok       config: {args.config}: {len(config.syncs)} sync(s), {len(config.sources)} source(s)")
        return EXIT_OK
    from itertools import chain

    from syncd.checks import probe_api, run_checks

    problems = 0
    for line in chain(run_checks(config, args.config), probe_api(config)):
        if line.severity == "error":
            problems += 1
        if not args.quiet or line.severity != "ok":
            print(f"{line.severity:7}  {line.subject}: {line.message}")
    return EXIT_FAILED if problems else EXIT_OK


def _status(args: argparse.Namespace) -> int:
    config = _load(args)
    from syncd.status import EXIT_UNREADABLE, StateUnavailable, collect_status, exit_code, render

    problems: list[str] = []
    try:
        rows = collect_status(config, problems=problems)
    except StateUnavailable as error:
        print(f"syncd: {error}", file=sys.stderr)
        return EXIT_UNREADABLE
    for problem in problems:
        print(f"syncd: {problem}", file=sys.stderr)
    if args.json:
        _print_json({"syncs": rows})
    else:
        sys.stdout.write(render(rows))
    return exit_code(rows)


def _dead_letters(args: argparse.Namespace) -> int:
    config = _load(args)
    if args.sync:
        config.sync(args.sync)
    from syncd import dead_letters

    if args.action == "discard" and not args.ids and not args.all:
        raise ConfigError(
            "dead-letters discard: name the dead letters to discard (ids from `dead-letters list`), "
            "or give --all to discard every open one" + (f" of sync {args.sync}" if args.sync else "")
        )
    if args.action == "retry":
        _require_secrets(config, [args.sync] if args.sync else None)
    with _open_runtime(config, migrate=True) as runtime:
        if args.action == "list":
            letters = dead_letters.listing(runtime, args.sync, include_resolved=args.all, ids=args.ids)
            if args.json:
                _print_json({"dead_letters": letters})
            else:
                sys.stdout.write(dead_letters.render(letters))
            return EXIT_OK
        if args.action == "discard":
            discarded = dead_letters.discard(runtime, args.sync, args.ids)
            sys.stdout.write(discarded.summary())
            return EXIT_OK if not discarded.not_open else EXIT_FAILED
        retried = dead_letters.retry(runtime, args.sync, args.ids)
        print(retried.summary())
        return EXIT_OK if retried.ok else EXIT_FAILED


def _reset(args: argparse.Namespace) -> int:
    config = _load(args)
    sync = config.sync(args.sync)
    _require_secrets(config, [sync.name], api=False)
    from syncd.errors import LeaseHeldError
    from syncd.source import SourceError, parse_watermark
    from syncd.values import key_text

    with _open_runtime(config) as runtime:
        # Holding the lease keeps a daemon from starting a cycle of this sync while we reset it.
        try:
            runtime.state.acquire_lease(sync.name, config.state.lease)
        except LeaseHeldError as held:
            if not args.force:
                raise CommandError(
                    f"{held} (a running syncd): stop it first, "
                    "or --force (the running syncd may then write its own watermark over the reset)"
                ) from None
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
    print(f"state database {config.state.display_url()} is " + ("up to date" if current else "NOT up to date"))
    return EXIT_OK if current else EXIT_FAILED


def _pushes(args: argparse.Namespace) -> int:
    config = _load(args)
    if args.sync:
        config.sync(args.sync)
    from syncd.status import push_rows, render_pushes

    state = _existing_state(config)
    try:
        rows = push_rows(state, args.sync, since=args.since, failed=args.failed, limit=args.limit)
    finally:
        state.close()
    if args.json:
        _print_json({"pushes": rows})
    else:
        sys.stdout.write(render_pushes(rows))
    return EXIT_OK


def _preview(args: argparse.Namespace) -> int:
    config = _load(args)
    sync = config.sync(args.sync)
    _require_secrets(config, [sync.name], api=False)
    from syncd import explain

    result = _explaining(lambda: explain.preview(config, sync, limit=args.limit, keys=args.key))
    if args.json:
        _print_json(result)
    else:
        sys.stdout.write(explain.render_preview(result))
    return EXIT_OK


def _inspect(args: argparse.Namespace) -> int:
    config = _load(args)
    sync = config.sync(args.sync)
    _require_secrets(config, [sync.name], api=False)
    from syncd import explain

    story = _explaining(lambda: explain.inspect(config, sync, args.key))
    if args.json:
        _print_json(story)
    else:
        sys.stdout.write(explain.render_story(story))
    return EXIT_OK


def _explaining(work: Callable[[], Any]) -> Any:
    from syncd.explain import ExplainError

    try:
        return work()
    except ExplainError as error:
        raise CommandError(str(error)) from None


def _demo(args: argparse.Namespace) -> int:
    from syncd.demo import DemoDirectoryError, run_demo

    try:
        return run_demo(rows=args.rows, directory=args.dir)
    except DemoDirectoryError as error:
        raise ConfigError(f"demo --dir: {error}") from None


def _simulate_api(args: argparse.Namespace) -> int:
    from syncd.simulator import run_from_args

    return run_from_args(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
