#!/usr/bin/env python3
"""An event subscriber that shares no code with Jetcall: plain asyncio and nats-py.

It stands for another team's service reacting to finished jobs (analytics, a search
index, ...). It creates a durable pull consumer of its own on the JOBS stream, filtered on
`jobs.completed.>`, fetches completions, acks each one, and prints one JSON line per
completion to stdout:

    {"job_id": "...", "kind": "...", "subject": "jobs.completed.<kind>", "status": "completed",
     "model": "...", "stream_seq": 12, "num_delivered": 1}

It exits 0 after `--count` completions, and 2 (saying why on stderr) when they have not all
arrived within `--timeout` seconds. The end-to-end test `external_subscriber` runs it
(services/e2e/tests/it/subscriber.rs); `cargo xtask test` installs the pinned nats-py.

    python completions.py --server nats://127.0.0.1:4222 --count 20 --timeout 60
"""

import argparse
import asyncio
import json
import sys

import nats
from nats.errors import TimeoutError as FetchTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

STREAM = "JOBS"
SUBJECT = "jobs.completed.>"


async def run(args: argparse.Namespace) -> int:
    nc = await nats.connect(args.server, name=f"{args.durable}-subscriber")
    try:
        js = nc.jetstream()
        # Created (or found, when it already exists with this configuration) by us, not by
        # Jetcall: every completion since the stream began, each acknowledged explicitly.
        await js.add_consumer(
            STREAM,
            ConsumerConfig(
                durable_name=args.durable,
                description="an external subscriber to completions (nats-py)",
                filter_subject=SUBJECT,
                deliver_policy=DeliverPolicy.ALL,
                ack_policy=AckPolicy.EXPLICIT,
            ),
        )
        sub = await js.pull_subscribe_bind(durable=args.durable, stream=STREAM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + args.timeout
        seen = 0
        while seen < args.count:
            remaining = deadline - loop.time()
            if remaining <= 0:
                print(
                    f"timed out after {args.timeout} s with {seen} of {args.count} completions",
                    file=sys.stderr,
                )
                return 2
            try:
                messages = await sub.fetch(
                    batch=min(100, args.count - seen), timeout=min(1.0, remaining)
                )
            except FetchTimeout:
                continue
            for msg in messages:
                event = json.loads(msg.data)
                # Acked (and the server's confirmation awaited) before it counts as seen.
                await msg.ack_sync()
                line = {
                    "job_id": event["job_id"],
                    "kind": event["kind"],
                    "subject": msg.subject,
                    "status": event.get("status"),
                    "model": event.get("model"),
                    "stream_seq": msg.metadata.sequence.stream,
                    "num_delivered": msg.metadata.num_delivered,
                }
                print(json.dumps(line), flush=True)
                seen += 1
        return 0
    finally:
        await nc.drain()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", required=True, help="the NATS URL")
    parser.add_argument("--durable", default="analytics", help="the consumer's name")
    parser.add_argument("--count", type=int, required=True, help="completions to wait for")
    parser.add_argument("--timeout", type=float, required=True, help="seconds to wait in all")
    return asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
