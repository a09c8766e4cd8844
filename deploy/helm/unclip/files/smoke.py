"""unclip smoke test: generate one image through the gateway and check it is a PNG.

Run by `helm test` (mounted from a ConfigMap into a Pod of the unclip image) and by tests/kind
against a port-forward. Through Ray Serve's gRPC proxy a call reaches an application by the
`application` metadata key, so the stub is called with that metadata directly (no SDK option needed).

    python smoke.py HOST:PORT [--application gateway] [--prompt "a red circle"] [--size 32] [--steps 2]
"""

from __future__ import annotations

import argparse
import sys
import time

import grpc

from unclip.v1 import images_pb2, images_pb2_grpc

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("server", help="HOST:PORT of the gateway (Serve's gRPC proxy)")
    parser.add_argument("--application", default="gateway", help="Serve application (metadata 'application'); '' sends none")
    parser.add_argument("--prompt", default="a red circle")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds, including waiting for the gateway")
    args = parser.parse_args()

    metadata = (("application", args.application),) if args.application else ()
    params = images_pb2.GenerationParameters(
        prompt=args.prompt, n=1, size=args.size, seed=args.seed,
        prior_steps=args.steps, decoder_steps=args.steps, upsampler_steps=args.steps,
    )  # fmt: skip
    deadline = time.monotonic() + args.timeout
    with grpc.insecure_channel(args.server) as channel:
        stub = images_pb2_grpc.ImageServiceStub(channel)
        while True:
            left = deadline - time.monotonic()
            try:
                response = stub.Generate(images_pb2.GenerateRequest(parameters=params), metadata=metadata, timeout=max(left, 1.0))
                break
            except grpc.RpcError as error:
                retriable = error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND)
                if not retriable or time.monotonic() + 5 > deadline:
                    print(f"smoke: Generate failed: {error.code().name}: {error.details()}", file=sys.stderr)
                    return 1
                print(f"smoke: {error.code().name} ({error.details()}); retrying", file=sys.stderr, flush=True)
                time.sleep(5)
    if len(response.images) != 1:
        print(f"smoke: expected 1 image, got {len(response.images)}", file=sys.stderr)
        return 1
    image = response.images[0]
    if not image.png.startswith(PNG_SIGNATURE) or (image.width, image.height) != (args.size, args.size):
        print(f"smoke: not a {args.size}x{args.size} PNG: {image.width}x{image.height}, {image.png[:8]!r}", file=sys.stderr)
        return 1
    print(f"smoke: ok: {image.width}x{image.height} PNG, {len(image.png)} bytes, seed {image.seed}, request {response.request_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
