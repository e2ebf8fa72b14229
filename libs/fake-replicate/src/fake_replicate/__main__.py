"""``python -m fake_replicate --token T --webhook-secret whsec_... [--port 0] [knobs]``.

Prints one JSON line ``{"url": "http://127.0.0.1:PORT", "pid": N}`` on stdout once listening; logs go
to stderr as JSON. Every FakeConfig field is a flag (``--create-500-rate 0.05``) and an env var
(``FAKE_REPLICATE_CREATE_500_RATE``); list fields take JSON (``'["start"]'``) or comma-separated values.
``--force-429-next N`` answers the next N creates with 429. ``--event-loop uvloop|asyncio`` (uvloop by
default). SIGTERM/SIGINT stop it gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import typing
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from conveyor_common.logging import configure_logging
from fake_replicate.config import FakeConfig
from fake_replicate.server import FakeReplicate

ENV_PREFIX = "FAKE_REPLICATE_"


def _is_list(name: str) -> bool:
    annotation = FakeConfig.model_fields[name].annotation
    return typing.get_origin(annotation) is list


def _coerce(name: str, raw: str) -> Any:
    if not _is_list(name):
        return raw
    text = raw.strip()
    if text.startswith("["):
        return json.loads(text)
    items: list[Any] = [v.strip() for v in text.split(",") if v.strip()]
    return [int(v) if v.isdigit() else v for v in items]


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, FakeConfig]:
    parser = argparse.ArgumentParser(prog="fake_replicate", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=os.environ.get(ENV_PREFIX + "HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get(ENV_PREFIX + "PORT", "0")))
    parser.add_argument("--log-level", default=os.environ.get(ENV_PREFIX + "LOG_LEVEL", "INFO"))
    parser.add_argument("--force-429-next", type=int, default=0)
    parser.add_argument(
        "--event-loop",
        choices=("uvloop", "asyncio"),
        default=os.environ.get(ENV_PREFIX + "EVENT_LOOP", "uvloop"),
        help="uvloop (the default: the fake's CPU shares the machine it measures) or asyncio's own",
    )
    for name, info in FakeConfig.model_fields.items():
        parser.add_argument(
            "--" + name.replace("_", "-"), dest=name, default=None, help=info.description
        )
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for name in FakeConfig.model_fields:
        raw = getattr(args, name)
        if raw is None:
            raw = os.environ.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = _coerce(name, raw)
    try:
        config = FakeConfig.model_validate(values)
    except ValidationError as exc:
        parser.error(str(exc))
    if args.force_429_next:
        config.create_script = [*config.create_script, *([429] * args.force_429_next)]
    return args, config


async def run(args: argparse.Namespace, config: FakeConfig) -> None:
    fake = FakeReplicate(config, host=args.host, port=args.port)
    url = await fake.start()
    sys.stdout.write(json.dumps({"url": url, "pid": os.getpid()}) + "\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await fake.stop()


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """``uvloop``'s loop, or ``None`` for asyncio's own."""
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def main(argv: Sequence[str] | None = None) -> None:
    args, config = parse_args(argv)
    configure_logging("fake-replicate", args.log_level, stream=sys.stderr)
    with asyncio.Runner(loop_factory=loop_factory(args.event_loop)) as runner:
        runner.run(run(args, config))


if __name__ == "__main__":
    main()
