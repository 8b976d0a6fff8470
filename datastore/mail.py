"""E-mail: confirmation links, retention and access-end notices.

Mail always goes through a real SMTP server. Production points :class:`Mailer` at the
institution's relay; the embedded default and the tests run :class:`LocalMailbox`, an aiosmtpd
server on loopback that keeps every message as a file under the data directory (and, in the
embedded default, prints confirmation links to the console).
"""

from __future__ import annotations

import email
import email.policy
import os
import smtplib
import ssl
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

from traitlets import Bool, Int, Unicode, default
from traitlets.config import LoggingConfigurable


class MailError(Exception):
    """The message could not be handed to the SMTP server."""


class Mailer(LoggingConfigurable):
    """Sends mail through an SMTP server."""

    smtp_host = Unicode("127.0.0.1", help="SMTP server host.").tag(config=True)
    smtp_port = Int(8025, help="SMTP server port (the embedded default's local mailbox: 8025).").tag(config=True)
    smtp_starttls = Bool(False, help="Use STARTTLS (production relays: yes).").tag(config=True)
    smtp_user = Unicode("", help="SMTP login (empty: none).").tag(config=True)
    smtp_password = Unicode(help="SMTP password. Default: $LABVAULT_SMTP_PASSWORD.").tag(config=True)

    @default("smtp_password")
    def _default_smtp_password(self):
        return os.environ.get("LABVAULT_SMTP_PASSWORD", "")

    sender = Unicode("labvault <labvault@localhost>", help="From: address of labvault's mail.").tag(config=True)
    timeout = Int(30, help="Seconds to wait for the SMTP server.").tag(config=True)

    def message(self, to: str, subject: str, body: str, headers: dict | None = None) -> EmailMessage:
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = self.sender, to, subject
        for k, v in (headers or {}).items():
            msg[k] = v
        msg.set_content(body)
        return msg

    def send(self, to: str, subject: str, body: str, headers: dict | None = None) -> None:
        """Hand one message to the SMTP server; raise :class:`MailError` if it is not accepted."""
        msg = self.message(to, subject, body, headers)
        try:
            with smtplib.SMTP(self.smtp_host, self.smtp_port, timeout=self.timeout) as smtp:
                if self.smtp_starttls:
                    smtp.starttls(context=ssl.create_default_context())
                if self.smtp_user:
                    smtp.login(self.smtp_user, self.smtp_password)
                smtp.send_message(msg)
        except (OSError, smtplib.SMTPException) as e:
            raise MailError(f"mail to the SMTP server {self.smtp_host}:{self.smtp_port} failed: {e}") from None
        self.log.info("mail sent: %r", subject)  # never the recipient's address or the body


class _StoreHandler:
    """aiosmtpd handler: each message becomes one ``.eml`` file, written atomically."""

    def __init__(self, directory: Path, echo):
        self.directory, self.echo = directory, echo

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd's hook name
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(envelope.content)
        final = self.directory / f"{time.time_ns()}-{os.getpid()}.eml"
        os.replace(tmp, final)
        if self.echo:
            self.echo(email.message_from_bytes(envelope.content, policy=email.policy.default))
        return "250 Message accepted for delivery"


class LocalMailbox:
    """A real SMTP server on loopback that stores messages under ``directory``."""

    def __init__(self, directory: str | Path, host: str = "127.0.0.1", port: int = 0, echo=None):
        from aiosmtpd.controller import Controller

        self.directory = Path(directory)
        if port == 0:
            import socket

            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port = host, port
        self._controller = Controller(_StoreHandler(self.directory, echo), hostname=host, port=port)

    def start(self) -> LocalMailbox:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()

    def __enter__(self) -> LocalMailbox:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def messages(self) -> list[EmailMessage]:
        """Every stored message, oldest first."""
        files = sorted(self.directory.glob("*.eml")) if self.directory.exists() else []
        return [email.message_from_bytes(f.read_bytes(), policy=email.policy.default) for f in files]

    def wait_for(self, predicate, timeout: float = 10.0) -> EmailMessage:
        """The first message for which ``predicate(msg)`` is true, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            for msg in self.messages():
                if predicate(msg):
                    return msg
            if time.monotonic() > deadline:
                raise TimeoutError("no such message arrived")
            time.sleep(0.05)


def _print_message(msg: EmailMessage) -> None:
    """The embedded default's console: who got what, and the links in it (confirmation links)."""
    import re

    body = msg.get_body(("plain",))
    text = body.get_content() if body is not None else ""
    links = re.findall(r"https?://\S+", text)
    print(f"labvault mailbox: to {msg['To']}: {msg['Subject']}", flush=True)
    for link in links:
        print(f"labvault mailbox:   {link}", flush=True)


def _mailbox_command():
    """``labvault mailbox``: the embedded default's SMTP server (a Hub-managed service)."""
    import signal
    import threading

    from .cli import LabvaultCommand

    class MailboxCommand(LabvaultCommand):
        name = "labvault-mailbox"
        description = ("Run a local SMTP server on loopback that stores every message under "
                       "<data-dir>/mail/ and prints confirmation links (the embedded default).")
        port = Int(8025, help="Port of the local SMTP server.").tag(config=True)
        ip = Unicode("127.0.0.1", help="Interface of the local SMTP server (keep it on loopback).").tag(config=True)
        aliases = {**LabvaultCommand.aliases, "port": "MailboxCommand.port", "ip": "MailboxCommand.ip"}

        def run(self):
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            signal.signal(signal.SIGINT, lambda *_: stop.set())
            directory = Path(self.data_dir).resolve() / "mail"
            with LocalMailbox(directory, host=self.ip, port=self.port, echo=_print_message):
                print(f"labvault mailbox: smtp://{self.ip}:{self.port}, messages in {directory}", flush=True)
                stop.wait()

    return MailboxCommand


MailboxCommand = _mailbox_command()
