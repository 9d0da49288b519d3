"""`vdiff-api`: the gateway alone."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hypercorn.asyncio import serve
from hypercorn.config import Config as HyperConfig
from loguru import logger

from vdiff_api.app import Gateway, Settings
from vdiff_api.dispatcher import Dispatcher
from vdiff_api.frontdoor import Policy
from vdiff_common import config, curve
from vdiff_common.logging import setup_logging


def add_gateway_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("gateway")
    config.add(g, "--host", default="127.0.0.1", help="HTTP bind address")
    config.add(g, "--port", default=8000, type=int, help="HTTP port")
    config.add(
        g,
        "--zmq-bind",
        default="tcp://127.0.0.1:5557",
        help="ZeroMQ ROUTER address workers connect to",
    )
    config.add(
        g,
        "--zmq-curve-dir",
        default=None,
        help="CURVE key directory (`vdiff keys generate DIR`): the worker socket is "
        "encrypted and admits only the worker keys in DIR/authorized",
    )
    config.add(
        g,
        "--heartbeat-interval",
        default=1.0,
        type=float,
        help="seconds between heartbeats; a peer silent for 3 is dead",
    )
    config.add(
        g,
        "--max-request-bytes",
        default=1 << 20,
        type=int,
        help="largest accepted request body (413 beyond)",
    )
    config.add(
        g,
        "--drain-timeout",
        default=30.0,
        type=float,
        help="seconds in-flight requests get to finish on SIGTERM",
    )
    config.add(
        g,
        "--expect-model",
        default=[],
        repeat=True,
        help="model that must be served before /health/ready is 200 (repeatable)",
    )
    config.add(g, "--log-level", default="info", help="log level")
    config.add(g, "--log-format", default="text", choices=["text", "json"], help="log format")
    s = p.add_argument_group("gateway security and limits")
    config.add(
        s,
        "--api-key",
        default=[],
        repeat=True,
        help="accepted API key (repeatable; comma-separated in the environment): "
        "/v1/*, /tokenize and /detokenize then need 'Authorization: Bearer KEY'",
    )
    config.add(
        s,
        "--api-key-file",
        default=[],
        repeat=True,
        help="file of accepted API keys, one per line ('#' starts a comment line)",
    )
    config.add(
        s, "--protect-metrics", default=False, type=bool, help="/metrics needs an API key too"
    )
    config.add(
        s,
        "--rate-limit-requests",
        default=0,
        type=int,
        help="requests per minute per API key (per client IP without keys); 0 = off",
    )
    config.add(
        s,
        "--rate-limit-tokens",
        default=0,
        type=int,
        help="generated tokens per minute per API key (per client IP); 0 = off",
    )
    config.add(
        s,
        "--trusted-proxies",
        default=[],
        repeat=True,
        help="CIDRs of proxies whose X-Forwarded-For names the client (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vdiff-api", description=__doc__)
    add_gateway_args(p)
    return p


@dataclass
class Security:
    policy: Policy  # API keys, rate limits, proxies
    curve: tuple[curve.Keys, Path] | None  # the worker socket's keypair, admitted keys


def security_or_exit(args: argparse.Namespace) -> Security:
    """The gateway's security settings from its flags; a flag that cannot work exits 2."""
    try:
        return Security(
            Policy.from_args(args),
            curve.server_keys(args.zmq_curve_dir) if args.zmq_curve_dir else None,
        )
    except ValueError as err:
        logger.error("{}", err)
        sys.exit(2)


async def run_gateway(
    args: argparse.Namespace, security: Security, stop: asyncio.Event | None = None
) -> int:
    policy = security.policy
    dispatcher = Dispatcher(
        args.zmq_bind, heartbeat_s=args.heartbeat_interval, curve=security.curve
    )
    gateway = Gateway(
        dispatcher,
        Settings(max_request_bytes=args.max_request_bytes, expected_models=list(args.expect_model)),
        policy,
    )
    hc = HyperConfig()
    hc.bind = [f"{args.host}:{args.port}"]
    hc.accesslog = None  # the front door writes one access line per request
    hc.errorlog = logging.getLogger("hypercorn.error")  # through loguru (setup_logging)
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

    logger.info(
        "vdiff gateway on http://{}:{} ({} API keys, rate limits {})",
        args.host,
        args.port,
        len(policy.keys) or "no",
        "on" if policy.limiter.enabled else "off",
    )
    await serve(gateway.app, hc, shutdown_trigger=shutdown_trigger)  # type: ignore[arg-type]
    return 0


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    security = security_or_exit(args)
    sys.exit(asyncio.run(run_gateway(args, security)))


if __name__ == "__main__":
    main()
