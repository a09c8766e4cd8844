"""unclip smoke test: generate one image through the gateway with the SDK and check it.

Run by `helm test` (mounted from a ConfigMap into a Pod of the unclip image), by tests/kind
against a port-forward, and by tests/test_helm.py against a local gateway. Through Ray Serve's
gRPC proxy a call reaches an application by the `application` metadata key, which the SDK sends
when given `application`.

    python smoke.py HOST:PORT [--application gateway] [--prompt "a red circle"] [--size 32] [--steps 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import grpc

from unclip.client import Client, UnclipError

# A fresh release answers NOT_FOUND until Serve has deployed the gateway application.
NOT_READY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND)
RETRY_SECONDS = 5.0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("server", help="HOST:PORT of the gateway (Serve's gRPC proxy, or `unclip serve gateway`)")
    parser.add_argument("--application", default="gateway", help="Serve application to route to; '' for none")
    parser.add_argument("--prompt", default="a red circle")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds, including waiting for the gateway")
    args = parser.parse_args()

    deadline = time.monotonic() + args.timeout
    # A gateway with API keys wants one (UNCLIP_API_KEY: the chart's tests.apiKeySecret).
    api_key = os.environ.get("UNCLIP_API_KEY") or None
    with Client(args.server, application=args.application or None, timeout=args.timeout, api_key=api_key) as client:
        while True:
            try:
                (image,) = client.generate(
                    args.prompt,
                    n=1,
                    size=args.size,
                    seed=args.seed,
                    prior_steps=args.steps,
                    decoder_steps=args.steps,
                    upsampler_steps=args.steps,
                    timeout=max(deadline - time.monotonic(), 1.0),
                )
                break
            except UnclipError as error:
                if error.code not in NOT_READY or time.monotonic() + RETRY_SECONDS > deadline:
                    print(f"smoke: {error}", file=sys.stderr)
                    return 1
                print(f"smoke: not ready ({error.code.name}); retrying", file=sys.stderr, flush=True)
                time.sleep(RETRY_SECONDS)
    if (image.width, image.height) != (args.size, args.size) or image.image.size != (args.size, args.size):
        print(f"smoke: expected a {args.size}x{args.size} image, got {image.width}x{image.height}", file=sys.stderr)
        return 1
    if image.seed != args.seed or image.metadata.get("prompt") != args.prompt:
        print(f"smoke: the PNG's metadata does not match the request: {image.metadata}", file=sys.stderr)
        return 1
    print(f"smoke: ok: {image.width}x{image.height} PNG, {len(image.png)} bytes, seed {image.seed}, request {image.request_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
