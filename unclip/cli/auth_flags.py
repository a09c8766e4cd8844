"""The API-key and quota flags of `unclip serve` (docs/security.md, "Who may call")."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from unclip import settings
from unclip.cli.common import positive_int
from unclip.stage import GATEWAY

# The targets that run a gateway here (ray takes the keys file too, for its gateway app).
GATEWAY_TARGETS = (GATEWAY, "all", "ray")


class AuthFlagError(ValueError):
    """Auth flags that do not fit the target, or a gateway that would be exposed without keys."""


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    auth = parser.add_argument_group("API keys and quotas (docs/security.md)")
    auth.add_argument(
        "--api-keys",
        type=Path,
        metavar="FILE",
        help="gateway, all, ray: callers must send one of this file's keys (`unclip keys create NAME --file FILE`); "
        f"read again when it changes (default: ${settings.API_KEYS_FILE.name}; unset: no keys, loopback only)",
    )
    auth.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="gateway, all, ray: serve beyond loopback (--host; ray: its config's http_options.host) without API keys: "
        "anyone who reaches it may use it",
    )
    auth.add_argument(
        "--images-per-minute",
        type=positive_int,
        metavar="N",
        help="gateway, all, ray: images each API key may make per minute (a key's own limit in the keys file wins; "
        "counted per gateway process)",
    )
    auth.add_argument(
        "--max-concurrent-per-key",
        type=positive_int,
        metavar="N",
        help="gateway, all, ray: requests each API key may have in flight (a key's own limit in the keys file wins; "
        "counted per gateway process)",
    )


def keys_file(args: argparse.Namespace) -> Path | None:
    """--api-keys, else UNCLIP_API_KEYS_FILE; None: keys off."""
    given = args.api_keys or settings.API_KEYS_FILE.get()
    return None if given is None else Path(given)


def check_serve_flags(args: argparse.Namespace) -> None:
    """AuthFlagError for auth flags a stage does not take, quotas without keys, and a gateway
    that would listen beyond loopback without keys (unless --insecure-no-auth)."""
    from gateway.auth import check_exposure

    given = [
        flag
        for flag, name in (("--api-keys", "api_keys"), ("--insecure-no-auth", "insecure_no_auth"),
                           ("--images-per-minute", "images_per_minute"), ("--max-concurrent-per-key", "max_concurrent_per_key"))
        if getattr(args, name)
    ]  # fmt: skip
    if args.target not in GATEWAY_TARGETS:
        if given:
            raise AuthFlagError(f"{', '.join(given)}: for the gateway (serve gateway, all or ray), not a stage")
        return
    path = keys_file(args)
    if path is None and (args.images_per_minute or args.max_concurrent_per_key):
        raise AuthFlagError("--images-per-minute and --max-concurrent-per-key are per API key: give --api-keys FILE too")
    if path is not None and args.insecure_no_auth:
        raise AuthFlagError("--insecure-no-auth and API keys (--api-keys or UNCLIP_API_KEYS_FILE) contradict each other")
    if args.target != "ray":  # Ray's proxies bind its config's http_options.host
        try:
            check_exposure(args.host, path, args.insecure_no_auth)
        except ValueError as error:
            raise AuthFlagError(str(error)) from None


def gateway_access(args: argparse.Namespace) -> Any:
    """The gateway's `gateway.auth.Access` from the flags (KeysFileError when the file cannot be read)."""
    from gateway.auth import Access
    from gateway.quotas import QuotaLimits

    return Access.from_file(keys_file(args), QuotaLimits(args.images_per_minute, args.max_concurrent_per_key))


def gateway_args(args: argparse.Namespace) -> list[str]:
    """The flags that give a gateway process the same keys and quotas (`serve all` starts one)."""
    path = keys_file(args)
    flags = [] if path is None else ["--api-keys", str(path.resolve())]
    if args.insecure_no_auth:
        flags.append("--insecure-no-auth")
    if args.images_per_minute:
        flags += ["--images-per-minute", str(args.images_per_minute)]
    if args.max_concurrent_per_key:
        flags += ["--max-concurrent-per-key", str(args.max_concurrent_per_key)]
    return flags


def configure_ray(config: dict[str, Any], args: argparse.Namespace) -> None:
    """Put the keys file and quota defaults into the Serve config's gateway apps' args, and refuse
    (ValueError) proxies bound beyond loopback with a gateway app that has no keys."""
    from gateway.auth import check_exposure

    path = keys_file(args)
    host = str((config.get("http_options") or {}).get("host", "127.0.0.1"))
    for app in config.get("applications") or []:
        if not str(app.get("import_path", "")).endswith(":gateway_app"):
            continue
        app_args = app.setdefault("args", {}) or {}
        app["args"] = app_args
        if path is not None:
            app_args["api_keys_file"] = str(path.resolve())
        for name in ("images_per_minute", "max_concurrent_per_key"):
            if getattr(args, name):
                app_args[name] = getattr(args, name)
        if (app_args.get("images_per_minute") or app_args.get("max_concurrent_per_key")) and not app_args.get("api_keys_file"):
            raise ValueError("the gateway app's per-key quotas need API keys: give --api-keys FILE")
        check_exposure(host, app_args.get("api_keys_file"), args.insecure_no_auth)
