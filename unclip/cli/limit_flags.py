"""The admission-control and timeout flags of `unclip serve` (docs/deploy.md, "Limits")."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from gateway.admission import DEFAULT_BODY_TIMEOUT_SECONDS, DEFAULT_MAX_CONCURRENT_REQUESTS, GatewayLimits
from unclip.cli.common import positive
from unclip.cost import DEFAULT_MAX_REQUEST_COST
from unclip.limits import DEFAULT_TIMEOUT_SECONDS


def _limit(kind: type) -> Callable[[str], Any]:
    """A limit where 0 turns it off (None)."""

    def parse(text: str) -> float | int | None:
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be 0 (no limit) or positive, got {text}")
        return None if value == 0 else value

    parse.__name__ = kind.__name__
    return parse


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    limits = parser.add_argument_group("limits (docs/deploy.md#limits; ray: the gateway app's args in its config)")
    limits.add_argument(
        "--max-concurrent-requests",
        type=_limit(int),
        default=DEFAULT_MAX_CONCURRENT_REQUESTS,
        metavar="N",
        help="gateway, all: requests the gateway works on at once, gRPC and HTTP together; one more is refused at once "
        f"with RESOURCE_EXHAUSTED / HTTP 429 and Retry-After (default {DEFAULT_MAX_CONCURRENT_REQUESTS}; 0: no limit)",
    )
    limits.add_argument(
        "--max-request-cost",
        type=_limit(int),
        default=DEFAULT_MAX_REQUEST_COST,
        metavar="N",
        help="gateway, all: the most denoising steps x image rows one request may ask for (unclip/cost.py); above it "
        f"INVALID_ARGUMENT / HTTP 400 (default {DEFAULT_MAX_REQUEST_COST}; 0: no limit)",
    )
    limits.add_argument(
        "--default-timeout",
        type=_limit(float),
        default=DEFAULT_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help="every gRPC server: the deadline of a call that brings none, passed on to the stages it calls "
        f"(default {DEFAULT_TIMEOUT_SECONDS:g}; 0: none)",
    )
    limits.add_argument(
        "--body-timeout",
        type=positive(float),
        default=DEFAULT_BODY_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help="gateway, all: an HTTP request's body must arrive within this many seconds, or it gets 408 and the "
        f"connection closes (default {DEFAULT_BODY_TIMEOUT_SECONDS:g})",
    )


def gateway_limits(args: argparse.Namespace) -> GatewayLimits:
    return GatewayLimits(
        max_concurrent_requests=args.max_concurrent_requests,
        max_request_cost=args.max_request_cost,
        default_timeout=args.default_timeout,
        body_timeout=args.body_timeout,
    )
