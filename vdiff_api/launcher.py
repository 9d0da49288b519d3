"""`vdiff`: all-in-one — a gateway in this process plus local worker subprocesses."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import signal
import subprocess
import sys

from loguru import logger

from vdiff_api.cli import Security, add_gateway_args, run_gateway, security_or_exit
from vdiff_common import config, curve
from vdiff_common.logging import setup_logging


def _worker_flags() -> argparse.ArgumentParser:
    # The worker's flags are defined once, in vdiff_worker.cli; importing it does not load torch.
    from vdiff_worker.cli import add_worker_args

    p = argparse.ArgumentParser(add_help=False)
    add_worker_args(p, standalone=False)
    return p


def build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    worker = _worker_flags()
    p = argparse.ArgumentParser(
        prog="vdiff",
        parents=[worker],
        description="OpenAI-compatible server for diffusion LMs",
        epilog="`vdiff keys generate DIR` makes the CURVE keys that --zmq-curve-dir uses.",
    )
    add_gateway_args(p)
    config.add(p, "--workers", default=1, type=int, help="local worker processes to start")
    return p, worker


def die_with_parent() -> None:
    """In the child: get SIGTERM when the parent dies, even by SIGKILL, so no worker is
    orphaned (Linux prctl PR_SET_PDEATHSIG; elsewhere the launcher's own clean-up applies)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


def worker_argv(args: argparse.Namespace, worker: argparse.ArgumentParser) -> list[str]:
    """Re-express the worker's options as flags for its own process."""
    argv: list[str] = []
    for action in worker._actions:
        if not action.option_strings:
            continue
        flag, value = action.option_strings[0], getattr(args, action.dest)
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv


async def _run(
    args: argparse.Namespace, worker: argparse.ArgumentParser, security: Security
) -> int:
    common = [
        "--gateway",
        args.zmq_bind,
        "--heartbeat-interval",
        str(args.heartbeat_interval),
        "--drain-timeout",
        str(args.drain_timeout),
        "--log-level",
        args.log_level,
        "--log-format",
        args.log_format,
    ]
    if args.zmq_curve_dir:
        common += ["--zmq-curve-dir", args.zmq_curve_dir]  # the same directory's worker.key
    procs = []
    for i in range(args.workers):
        own = ["--worker-id", f"local-{i}"]
        if args.metrics_port is not None:
            own += ["--metrics-port", str(args.metrics_port + i)]  # one port per local worker
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "vdiff_worker", *worker_argv(args, worker), *common, *own],
                preexec_fn=die_with_parent,
            )
        )
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            await asyncio.sleep(0.5)
            if all(p.poll() is not None for p in procs):
                logger.error("every worker process exited; stopping")
                stop.set()

    watcher = asyncio.create_task(watch())
    try:
        code = await run_gateway(args, security, stop)
    finally:
        watcher.cancel()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=args.drain_timeout + 5)
            except subprocess.TimeoutExpired:
                p.kill()
    failed = [p.returncode for p in procs if p.returncode not in (0, -signal.SIGTERM)]
    return code or (1 if failed else 0)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["keys"]:
        sys.exit(curve.keys_main(argv[1:]))
    parser, worker = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    security = security_or_exit(args)
    sys.exit(asyncio.run(_run(args, worker, security)))
