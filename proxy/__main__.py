"""The `tollgate` command: serve, stats, export, reset, check."""

from __future__ import annotations

import argparse
import asyncio
import csv
import logging
import os
import sys
import time

from datetime import datetime

import aiohttp
import orjson

from . import config as config_mod
from . import instance, limits, reports, serving, stats, workers
from .accounting import Accounting
from .app import create_app, replay_ledger
from .config import Config, ConfigError
from .limits import WindowStore
from .ledger import LedgerError, LedgerStore, ledger_exists, ledger_for
from .ledger import probe as probe_ledger
from .ledger import describe as describe_ledger
from .upstream import UpstreamClient, UpstreamError


def _parse_time(config: Config, value: str | None) -> float | None:
    """--since/--until, read in the stats zone like the HTTP reports' since/until."""
    if value is None:
        return None
    try:
        return reports.parse_time(value, config.stats.tz)
    except ValueError as exc:
        raise SystemExit(f"tollgate export: {exc}") from None


def _ledger(config: Config) -> LedgerStore | None:
    return ledger_for(config) if ledger_exists(config) else None


def _offline_state(config: Config) -> tuple[Accounting, WindowStore]:
    """/stats' state rebuilt from the ledger, as the server does at start."""
    acc, limiter = Accounting(None), limits.windows_for(config, time.time)
    ledger = _ledger(config)
    if ledger is not None:
        # Opening brings a ledger an older version left up to date (its one-time back-fill),
        # as `serve` would; no server is running, so nobody else is writing it.
        try:
            ledger.open(time.time())
        finally:
            ledger.close()
        replay_ledger(ledger, acc, limiter)
    return acc, limiter


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed (Linux, macOS): its transports halve the proxy's per-call
    CPU in the overhead benchmark; the standard loop elsewhere."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def cmd_serve(config: Config, args: argparse.Namespace) -> int:
    # Command-line overrides first, so the bind check judges the address actually bound.
    host = args.host or config.server.host
    port = args.port if args.port is not None else config.server.port
    config = config_mod.with_bind(config, host, port)
    if args.workers is not None:
        config = config_mod.with_workers(config, args.workers)
    config_mod.check_serve(config)
    # The logging HOWTO's optimisations: no caller lookup, thread or process names per record.
    # With a line per call, building log records was a twentieth of the proxy's CPU.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    access = logging.getLogger("tollgate.access")
    access.propagate = False
    # The lines come in batches already (access.py): a write and flush per call cost the proxy a
    # tenth of its throughput, one per batch costs nothing.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    # The ledger writer thread waits for the GIL after every SQLite step; at the default 5 ms
    # switch interval a busy event loop held it back by up to 100 ms under load (the SIGKILL test
    # caught it). 1 ms keeps the ledger within a few milliseconds of the calls.
    sys.setswitchinterval(0.001)
    logging.info("tollgate starting: ledger %s", describe_ledger(config))
    for warning in config_mod.missing_secrets(config):
        logging.warning("%s", warning)
    loop = _new_loop()
    if config.server.workers > 1 and args.worker is None:
        try:
            return loop.run_until_complete(workers.Supervisor(config).run())
        except OSError as exc:
            print(f"tollgate: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        finally:
            loop.close()
    worker = args.worker is not None
    if worker:
        workers.die_with_supervisor()

    def ready(name: str) -> None:
        if worker:  # its supervisor waits for this line
            logging.info("tollgate worker %d (pid %d) ready", args.worker, os.getpid())
            print("ready", flush=True)
        else:
            logging.info("tollgate ready on %s", name)

    try:
        # handler_cancellation: a client that hangs up cancels its call at once, so the upstream
        # request is closed and the call is recorded as cancelled without waiting for a write.
        loop.run_until_complete(serving.serve(create_app(config), config, ready, worker=worker))
    except LedgerError as exc:
        print(f"tollgate: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the address is taken, or not ours to bind
        print(f"tollgate: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    finally:
        loop.close()
    return 0


def _admin_headers(config: Config) -> dict[str, str]:
    token = config.server.admin_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


async def _ask(config: Config, server: instance.Running, method: str, path: str) -> bytes:
    """One admin request to the running server; SystemExit naming it if it does not answer 200."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.request(method, server.url + path, headers=_admin_headers(config)) as response:
                body = await response.read()
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise SystemExit(f"tollgate: {server} did not answer ({type(exc).__name__}); "
                         f"nothing was done") from None
    if response.status != 200:
        raise SystemExit(f"tollgate: {server} answered HTTP {response.status} to {method} {path}")
    return body


def cmd_stats(config: Config, args: argparse.Namespace) -> int:
    server = instance.find(config.server.data_dir)
    if server is not None:
        path = f"/stats?format=text&lang={args.lang}" if args.text else "/stats"
        body = asyncio.run(_ask(config, server, "GET", path))
        print(f"tollgate stats: from {server}", file=sys.stderr)
        if not args.text:
            body = orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2)
        sys.stdout.buffer.write(body.rstrip(b"\n") + b"\n")
        return 0
    print(f"tollgate stats: no server is running; figures from the ledger {describe_ledger(config)}", file=sys.stderr)
    acc, limiter = _offline_state(config)
    if args.text:
        print(stats.stats_text(config, acc, limiter, args.lang, running=False))
    else:
        data = stats.stats_json(config, acc, limiter, running=False)
        sys.stdout.buffer.write(orjson.dumps(data, option=orjson.OPT_INDENT_2) + b"\n")
    return 0


def cmd_export(config: Config, args: argparse.Namespace) -> int:
    if args.snapshot:
        # The seed's periodic line, appended like its own script does.
        acc, limiter = _offline_state(config)
        with open(args.snapshot, "a", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerow(reports.snapshot_row(stats.stats_json(config, acc, limiter), datetime.now()))
        return 0
    if not ledger_exists(config):
        raise SystemExit(f"tollgate export: no ledger at {config.db_path} yet")
    filters = reports.Filters(_parse_time(config, args.since), _parse_time(config, args.until))
    oldest = ledger_for(config).raw_since()
    if config.ledger.keep_raw_days is not None and oldest is not None and (filters.since or 0.0) < oldest:
        print(f"tollgate export: rows before {datetime.fromtimestamp(oldest, config.stats.tz).isoformat()} "
              f"were pruned (ledger.keep_raw_days = {config.ledger.keep_raw_days:g}); /stats and history "
              f"still count them", file=sys.stderr)
    out = sys.stdout.buffer if args.csv == "-" else open(args.csv, "wb")
    try:
        for chunk in reports.csv_chunks(ledger_for(config), filters, config.stats.tz):
            out.write(chunk)
    finally:
        if out is not sys.stdout.buffer:
            out.close()
    return 0


def cmd_reset(config: Config, args: argparse.Namespace) -> int:
    server = instance.find(config.server.data_dir)
    if server is not None:
        # The server holds the live aggregates: it writes the epoch and starts from it.
        answer = orjson.loads(asyncio.run(_ask(config, server, "POST", "/metrics/reset")))
        print(f"tollgate reset: reset {server}", file=sys.stderr)
    else:
        ledger = ledger_for(config)
        now = time.time()
        ledger.open(now)
        ledger.new_epoch(now)
        ledger.close()
        print(f"tollgate reset: no server is running; wrote a new epoch to the ledger {describe_ledger(config)}, "
              f"where the next start begins", file=sys.stderr)
        answer = {"message": "Métricas reiniciadas exitosamente", "nuevo_inicio": stats.fmt_time(config, now)}
    print(orjson.dumps(answer).decode())
    return 0


async def _probe_all(config: Config) -> bool:
    ok = True
    for upstream in config.upstreams.values():
        client = UpstreamClient(upstream)
        await client.start()
        try:
            result = await asyncio.wait_for(client.probe(), upstream.connect_timeout_s + 5)
        except (UpstreamError, asyncio.TimeoutError) as exc:
            result, ok = f"FAILED: {getattr(exc, 'message', 'timed out')}", False
        finally:
            await client.close()
        key = ""
        if upstream.api_key_env:
            key = f", key from ${upstream.api_key_env} ({'set' if upstream.api_key() else 'NOT SET'})"
        print(f"{upstream.name}: {upstream.kind} {upstream.base_url}{key}: {result}")
    return ok


def _probe_stores(config: Config) -> bool:
    """The shared stores the config names, asked as serve would ask them; one line each."""
    ok = True
    for what, env, found in (("limits: Redis", config.redis.url_env, limits.probe(config)),
                             ("ledger: PostgreSQL", config.ledger.dsn_env, probe_ledger(config))):
        if found is not None:
            answered, text = found
            ok = ok and answered
            print(f"{what} from ${env}: {text if answered else 'FAILED: ' + text}")
    return ok


def cmd_check(config: Config, args: argparse.Namespace) -> int:
    """Valid config, every secret's variable set, every upstream and shared store answering:
    else non-zero."""
    config_mod.check_serve(config)
    print(f"{config.source}: valid ({len(config.upstreams)} upstreams, ledger {describe_ledger(config)})")
    missing = config_mod.missing_secrets(config)
    for warning in missing:
        print(f"NOT SET: {warning}")
    reachable = asyncio.run(_probe_all(config))
    stores = _probe_stores(config)
    return 0 if reachable and stores and not missing else 2


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tollgate", description="Metering proxy for LLM APIs.")
    config_help = "path to config.toml (default: $TOLLGATE_CONFIG or ./config.toml)"
    parser.add_argument("-c", "--config", default=os.environ.get("TOLLGATE_CONFIG", "config.toml"), help=config_help)
    # -c also after the subcommand (`tollgate serve -c FILE`); SUPPRESS keeps the one before it
    # when it is not given again.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=argparse.SUPPRESS, help=config_help)
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", parents=[common], help="run the proxy (the default command)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=_positive, metavar="N", help="processes serving the port (server.workers); "
                       "above 1 needs limits.backend = \"redis\"")
    serve.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # one of a supervisor's workers
    st = sub.add_parser("stats", parents=[common], help="print /stats from the ledger (server may be stopped)")
    st.add_argument("--text", action="store_true", help="the WhatsApp text instead of JSON")
    st.add_argument("--lang", default="es", choices=stats.LANGS)
    ex = sub.add_parser("export", parents=[common], help="write ledger rows as CSV")
    what = ex.add_mutually_exclusive_group(required=True)
    what.add_argument("--csv", metavar="FILE", help="every ledger row (filtered) to FILE, - for stdout")
    what.add_argument("--snapshot", metavar="FILE", help="append the seed's one-line snapshot to FILE")
    ex.add_argument("--since", help="an ISO date or time (in the stats zone) or a unix time")
    ex.add_argument("--until", help="an ISO date or time (in the stats zone) or a unix time")
    sub.add_parser("reset", parents=[common], help="start a new stats epoch (no ledger row is deleted)")
    sub.add_parser("check", parents=[common], help="validate the config and probe each upstream")
    return parser


COMMANDS = {"serve": cmd_serve, "stats": cmd_stats, "export": cmd_export,
            "reset": cmd_reset, "check": cmd_check}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = config_mod.load(args.config)
        command = args.command or "serve"
        if command == "serve" and args.command is None:
            args.host, args.port, args.workers, args.worker = None, None, None, None
        code = COMMANDS[command](config, args)
        sys.stdout.flush()
        return code
    except ConfigError as exc:
        print(f"tollgate: config error: {exc}", file=sys.stderr)
        return 1
    except LedgerError as exc:  # a ledger a command cannot open (read-only, full disk): one line
        print(f"tollgate: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `tollgate stats --text | head -1`: the reader has what it wanted. Point stdout at
        # /dev/null so the interpreter's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130  # Ctrl-C: the shell's own convention, and no traceback


if __name__ == "__main__":
    sys.exit(main())
