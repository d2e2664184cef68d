#!/usr/bin/env python3
"""A real SMTP server for the tests: every message it accepts is written to OUT_DIR as
<n>.eml, with the envelope recipients on a first line "X-Envelope-To: a, b".

Usage: smtp_sink.py PORT OUT_DIR

It uses aiosmtpd when installed (pip install aiosmtpd) and the standard library's smtpd
(Python <= 3.11) otherwise. It prints "ready" once it accepts connections.
"""
import os
import sys
import time
import warnings

port = int(sys.argv[1])
out = sys.argv[2]
os.makedirs(out, exist_ok=True)
count = 0


def store(rcpts, data):
    global count
    if isinstance(data, bytes):
        data = data.decode("utf-8", "replace")
    count += 1
    tmp = os.path.join(out, f".{count}.tmp")
    with open(tmp, "w") as f:
        f.write("X-Envelope-To: " + ", ".join(rcpts) + "\n" + data)
    os.rename(tmp, os.path.join(out, f"{count}.eml"))


try:
    from aiosmtpd.controller import Controller

    class Handler:
        async def handle_DATA(self, server, session, envelope):
            store(envelope.rcpt_tos, envelope.content)
            return "250 OK"

    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    print("ready", flush=True)
    while True:
        time.sleep(3600)
except ImportError:
    warnings.simplefilter("ignore")
    import asyncore
    import smtpd

    class Sink(smtpd.SMTPServer):
        def process_message(self, peer, mailfrom, rcpttos, data, **kwargs):
            store(rcpttos, data)

    Sink(("127.0.0.1", port), None, decode_data=True)
    print("ready", flush=True)
    asyncore.loop()
