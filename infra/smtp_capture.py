#!/usr/bin/env python3
"""A local SMTP server that accepts every message and keeps it as a file.

Used by infra/local.sh (service `smtp`) so that newsroom's notifier has a real SMTP
server to talk to on a development machine and in the tests, which read the delivered
messages from the directory: one `<nanoseconds>-<n>.eml` file per message and recipient
list, the envelope recipients first as `X-Envelope-To:` lines, then the message as
received.
"""
import argparse
import asyncio
import itertools
import os
import signal
import time

from aiosmtpd.controller import Controller


class Keep:
    def __init__(self, directory):
        self.directory = directory
        self.counter = itertools.count()

    async def handle_DATA(self, server, session, envelope):
        name = f"{time.time_ns()}-{next(self.counter)}.eml"
        partial = os.path.join(self.directory, "." + name)
        with open(partial, "wb") as out:
            for rcpt in envelope.rcpt_tos:
                out.write(f"X-Envelope-To: {rcpt}\r\n".encode())
            out.write(envelope.original_content or envelope.content)
        # Complete files only: readers never see half a message.
        os.rename(partial, os.path.join(self.directory, name))
        return "250 Message accepted for delivery"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2525)
    parser.add_argument("--dir", required=True, help="where to keep the messages")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    controller = Controller(Keep(args.dir), hostname=args.host, port=args.port)
    controller.start()
    print(f"capturing mail on {args.host}:{args.port} into {args.dir}", flush=True)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.run_until_complete(stop.wait())
    controller.stop()


if __name__ == "__main__":
    main()
