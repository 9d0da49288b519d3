"""`vdiff-api`: the gateway alone."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time

from hypercorn.asyncio import serve
from hypercorn.config import Config as HyperConfig
from loguru import logger

from vdiff_api.app import Gateway, Settings
from vdiff_api.dispatcher import Dispatcher
from vdiff_common import config
from vdiff_common.logging import setup_logging


def add_gateway_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("gateway")
    config.add(g, "--host", default="127.0.0.1", help="HTTP bind address")
    config.add(g, "--port", default=8000, type=int, help="HTTP port")
    config.add(g, "--zmq-bind", default="tcp://127.0.0.1:5557",
               help="ZeroMQ ROUTER address workers connect to")
    config.add(g, "--heartbeat-interval", default=1.0, type=float,
               help="seconds between heartbeats; a peer silent for 3 is dead")
    config.add(g, "--max-request-bytes", default=1 << 20, type=int,
               help="largest accepted request body (413 beyond)")
    config.add(g, "--drain-timeout", default=30.0, type=float,
               help="seconds in-flight requests get to finish on SIGTERM")
    config.add(g, "--expect-model", default=[], repeat=True,
               help="model that must be served before /health/ready is 200 (repeatable)")
    config.add(g, "--log-level", default="info", help="log level")
    config.add(g, "--log-format", default="text", choices=["text", "json"], help="log format")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vdiff-api", description=__doc__)
    add_gateway_args(p)
    return p


async def run_gateway(args: argparse.Namespace, stop: asyncio.Event | None = None) -> int:
    dispatcher = Dispatcher(args.zmq_bind, heartbeat_s=args.heartbeat_interval)
    gateway = Gateway(dispatcher, Settings(max_request_bytes=args.max_request_bytes,
                                           expected_models=list(args.expect_model)))
    hc = HyperConfig()
    hc.bind = [f"{args.host}:{args.port}"]
    hc.accesslog = None
    hc.graceful_timeout = args.drain_timeout
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def shutdown_trigger() -> None:
        await stop.wait()
        gateway.draining = True
        logger.info("draining: {} requests in flight", gateway.active)
        deadline = time.monotonic() + args.drain_timeout
        while gateway.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    logger.info("vdiff gateway on http://{}:{}", args.host, args.port)
    await serve(gateway.app, hc, shutdown_trigger=shutdown_trigger)  # type: ignore[arg-type]
    return 0


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    sys.exit(asyncio.run(run_gateway(args)))


if __name__ == "__main__":
    main()
