"""Mail goes through a real SMTP server (aiosmtpd on loopback)."""

from __future__ import annotations

import pytest
from hubtools import free_port

from labvault.datastore.mail import LocalMailbox, Mailer, MailError


def test_a_message_reaches_the_local_mailbox_as_a_file(tmp_path):
    seen = []
    with LocalMailbox(tmp_path / "mail", echo=seen.append) as box:
        Mailer(smtp_port=box.port).send("pi@alpine.example", "Confirm your account",
                                        "Open http://127.0.0.1/confirm?t=abc")
        msg = box.wait_for(lambda m: m["Subject"] == "Confirm your account")
    assert msg["To"] == "pi@alpine.example"
    assert "confirm?t=abc" in msg.get_content()
    assert [m["Subject"] for m in seen] == ["Confirm your account"]
    assert len(list((tmp_path / "mail").glob("*.eml"))) == 1
    assert not list((tmp_path / "mail").glob("*.tmp"))  # written atomically


def test_an_unreachable_server_is_a_clear_error():
    with pytest.raises(MailError, match=r"SMTP server 127\.0\.0\.1:\d+ failed"):
        Mailer(smtp_port=free_port(), timeout=2).send("a@b.example", "x", "y")
