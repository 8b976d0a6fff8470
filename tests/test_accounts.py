"""Accounts on the service side (labvault.datastore.accounts), on SQLite and PostgreSQL.

Sign-up sends a real e-mail through a real SMTP server (aiosmtpd on loopback); passwords are
Argon2id; TOTP codes come from pyotp; every decision is in the audit log with the truncated IP
while the account keeps the full one. The Hub-facing flows run against a real JupyterHub in
test_hub_auth.py and test_hub_oauth.py; here each rule is pinned down quickly.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

import pyotp
import pytest
from sqlalchemy import select
from traitlets.config import Config

from labvault import policies as p
from labvault.datastore import audit
from labvault.datastore import operations as ops
from labvault.datastore.accounts import (
    AccountError,
    Accounts,
    LocalAccounts,
    token_hash,
    totp_counter,
)
from labvault.datastore.mail import LocalMailbox, Mailer
from labvault.datastore.models import AuditEvent, ExternalIdentity, LocalCredential, User

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
OP = ops.Actor(operator="test")
LINK = "http://hub.example/hub/labvault/confirm"
FAST = {"argon2_time_cost": 1, "argon2_memory_kib": 8192, "argon2_parallelism": 1}


@pytest.fixture
def mailbox(tmp_path):
    with LocalMailbox(tmp_path / "mail") as box:
        yield box


@pytest.fixture
def world(sessions, mailbox):
    ops.add_institution(sessions, OP, "Uni", domains=["uni.example"], idps=["https://idp.uni.example"])
    ops.add_institution(sessions, OP, "Unverified", domains=["unverified.example"], verified=False)
    ops.add_institution(sessions, OP, "Other", domains=["other.example"])
    ops.add_user(sessions, OP, "pat", institution="Uni", institutional_email="pat@uni.example",
                 verified_institutional_email=True)
    ops.add_user(sessions, OP, "sam", institution="Uni")
    ops.add_experiment(sessions, OP, "E-1", pi="pat")
    settings = LocalAccounts(config=Config({"LocalAccounts": FAST}))
    mailer = Mailer(smtp_port=mailbox.port)
    return Accounts(sessions, settings, p.Policy(), mailer)


def signup(acc, name="newbie", email=None, **kw):
    args = dict(name=name, display_name="New Bie", institution="Uni", email=email or f"{name}@uni.example",
                password="correct horse battery", adult=True, ip="192.168.17.4", link_base=LINK, now=NOW)
    args.update(kw)
    return acc.signup(**args)


def link_token(mailbox, to):
    msg = mailbox.wait_for(lambda m: m["To"] == to)
    link = re.search(r"(http\S+token=\S+)", msg.get_content()).group(1)
    assert link == msg["X-Labvault-Confirmation-Link"]
    return link.split("token=", 1)[1]


def events(sessions, action):
    with sessions() as s:
        return s.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)).all()


def test_signup_confirm_login_records_the_full_ip_on_the_account_only(world, sessions, mailbox):
    out = signup(world, "dana", email="Dana@Mail.Uni.Example")
    assert out.result == "ok" and out.decision.rule == "account.registration"
    with sessions() as s:
        user = s.scalar(select(User).where(User.name == "dana"))
        cred = s.get(LocalCredential, user.id)
        assert (user.state.value, user.email, user.institutional_email_verified_at) == \
            ("tentative", "dana@mail.uni.example", None)
        assert cred.password_hash.startswith("$argon2id$") and "correct horse" not in cred.password_hash
        assert cred.adult_confirmed_at == NOW and cred.signup_ip == "192.168.17.4"
    token = link_token(mailbox, "dana@mail.uni.example")
    with sessions() as s:  # only the hash of the token is stored
        assert s.scalar(select(LocalCredential.email_token_hash).where(LocalCredential.user_id == user.id)) \
            == token_hash(token)
    # tentative: the right password is not enough
    refused = world.login(name="dana", password="correct horse battery", totp=None, ip="10.1.2.3", now=NOW)
    assert (refused.result, refused.decision.rule) == ("refused", "account.state")
    assert "link" in refused.decision.reason
    # the link needs the account's password too (a mail scanner opening it confirms nothing)
    wrong = world.confirm(token=token, name="dana", password="not the password", totp=None, ip=None, now=NOW)
    assert wrong.decision.rule == "signin.credentials"
    ok = world.confirm(token=token, name="dana", password="correct horse battery", totp=None,
                       ip="10.1.2.3", now=NOW + timedelta(minutes=5))
    assert ok.result == "ok" and ok.account["state"] == "active" and ok.account["pi_verified"]
    assert ok.account["institution"] == "Uni" and ok.account["is_vendor"] is False
    again = world.confirm(token=token, name="dana", password="correct horse battery", totp=None, ip=None, now=NOW)
    assert again.result == "refused" and "unknown, used or expired" in again.decision.reason
    login = world.login(name="DANA ", password="correct horse battery", totp=None, ip="10.1.2.3",
                        now=NOW + timedelta(hours=1))
    assert login.result == "ok" and login.decision.rule == "signin.credentials"
    with sessions() as s:
        user = s.scalar(select(User).where(User.name == "dana"))
        assert (user.last_login_ip, user.last_login_at) == ("10.1.2.3", NOW + timedelta(hours=1))
        assert user.institutional_email_verified_at == NOW + timedelta(minutes=5)
    signins = events(sessions, "account.sign_in")
    # refused while tentative; signed in by the confirmation; signed in again
    assert [(e.allowed, e.rule, e.ip) for e in signins][-3:] == [(False, "account.state", "10.1.x.x"),
                                                                  (True, "signin.credentials", "10.1.x.x"),
                                                                  (True, "signin.credentials", "10.1.x.x")]
    assert all("10.1.2.3" not in str(e.details) for e in signins)
    assert events(sessions, "account.signup")[-1].ip == "192.168.x.x"
    with sessions() as s:
        assert audit.verify(s).ok


def test_signup_refusals_and_bad_input(world, sessions):
    for kw, rule in ((dict(adult=False), "account.adult"), (dict(institution="Unverified",
                     email="x@unverified.example"), "account.registration"),
                     (dict(institution="Nowhere"), "account.registration"),
                     # CVE-2022-31027: an address outside the institution's domains proves nothing
                     (dict(email="kim@other.example"), "account.registration"),
                     (dict(email="kim@uni.example.evil.example"), "account.registration")):
        out = signup(world, "kim", **kw)
        assert (out.result, out.decision.rule) == ("refused", rule), kw
    with pytest.raises(AccountError, match="at least 10"):
        signup(world, "kim", password="short")
    with pytest.raises(AccountError, match="bad user name"):
        signup(world, "Kim Smith!")
    with pytest.raises(AccountError, match="not an e-mail"):
        signup(world, "kim", email="kim at uni")
    with pytest.raises(AccountError, match="is taken") as e:
        signup(world, "sam")
    assert e.value.status == 409
    with sessions() as s:
        assert s.scalar(select(User).where(User.name == "kim")) is None
    assert [e.rule for e in events(sessions, "account.signup")][-5:] == \
        ["account.adult"] + ["account.registration"] * 4


def test_signing_up_again_sends_a_new_link_and_links_expire(world, sessions, mailbox):
    signup(world, "lee")
    first = link_token(mailbox, "lee@uni.example")
    signup(world, "lee", now=NOW + timedelta(hours=1))  # same details: a new link
    msgs = [m for m in mailbox.messages() if m["To"] == "lee@uni.example"]
    assert len(msgs) == 2
    second = re.search(r"token=(\S+)", msgs[-1].get_content()).group(1)
    assert second != first
    old = world.confirm(token=first, name="lee", password="correct horse battery", totp=None, ip=None, now=NOW)
    assert old.result == "refused"
    with pytest.raises(AccountError, match="taken"):  # a different password is someone else
        signup(world, "lee", password="another long password")
    late = NOW + timedelta(hours=1 + 48, seconds=1)
    expired = world.confirm(token=second, name="lee", password="correct horse battery", totp=None, ip=None, now=late)
    assert expired.result == "refused" and "expired" in expired.decision.reason


def test_lockout_after_repeated_failures_then_unlocks(world, sessions):
    world.set_password("sam", "sam's long password", NOW)
    policy = world.policy
    for i in range(policy.signin_lockout_attempts - 1):
        out = world.login(name="sam", password=f"guess {i}", totp=None, ip="10.0.0.9", now=NOW)
        assert out.decision.rule == "signin.credentials"
    locked = world.login(name="sam", password="guess again", totp=None, ip="10.0.0.9", now=NOW)
    assert locked.decision.rule == "signin.lockout" and "locked until 2026-06-01 12:15" in locked.decision.reason
    # locked: the right password is refused too, until the lock ends
    still = world.login(name="sam", password="sam's long password", totp=None, ip=None, now=NOW + timedelta(minutes=14))
    assert still.decision.rule == "signin.lockout"
    ok = world.login(name="sam", password="sam's long password", totp=None, ip=None, now=NOW + timedelta(minutes=15))
    assert ok.result == "ok"
    with sessions() as s:
        cred = s.scalar(select(LocalCredential).join(User).where(User.name == "sam"))
        assert (cred.failed_attempts, cred.locked_until) == (0, None)
    # unknown names answer like wrong passwords (and never lock anything)
    unknown = world.login(name="nobody", password="whatever", totp=None, ip=None, now=NOW)
    assert (unknown.decision.rule, unknown.decision.reason) == ("signin.credentials", "wrong user name or password")


def test_a_pi_enrols_totp_at_the_first_sign_in_and_then_needs_codes(world, sessions):
    world.set_password("pat", "pat's long password", NOW)
    out = world.login(name="pat", password="pat's long password", totp=None, ip="10.0.0.1", now=NOW)
    assert out.result == "enrol_totp" and out.decision.rule == "signin.second_factor"
    uri = out.enrolment["provisioning_uri"]
    assert uri.startswith("otpauth://totp/labvault:pat?") and f"secret={out.enrolment['secret']}" in uri
    totp = pyotp.TOTP(out.enrolment["secret"])
    # the same secret is shown until it is confirmed (another sign-in does not replace it)
    assert world.login(name="pat", password="pat's long password", totp=None, ip=None, now=NOW).enrolment == out.enrolment
    bad = world.confirm_totp(name="pat", code="000000" if totp.at(NOW) != "000000" else "111111",
                             ip=None, now=NOW, sign_in=True)
    assert bad.result == "refused"
    ok = world.confirm_totp(name="pat", code=totp.at(NOW), ip="10.0.0.1", now=NOW, sign_in=True)
    assert ok.result == "ok" and ok.decision.rule == "signin.second_factor" and ok.account["is_pi"]
    later = NOW + timedelta(minutes=1)
    need = world.login(name="pat", password="pat's long password", totp=None, ip=None, now=later)
    assert (need.result, need.decision.rule) == ("refused", "signin.second_factor")
    assert "code" in need.decision.reason
    good = world.login(name="pat", password="pat's long password", totp=totp.at(later), ip=None, now=later)
    assert good.result == "ok"
    # a code is used once only (no replay within its 30 seconds)
    replay = world.login(name="pat", password="pat's long password", totp=totp.at(later), ip=None, now=later)
    assert replay.result == "refused" and "wrong or expired" in replay.decision.reason
    # the wrong password with the right code says nothing about the code
    wrong_pw = world.login(name="pat", password="nope", totp=totp.at(later + timedelta(seconds=30)), ip=None,
                           now=later + timedelta(seconds=30))
    assert wrong_pw.decision.rule == "signin.credentials"


def test_voluntary_totp_enrolment(world, sessions):
    world.set_password("sam", "sam's long password", NOW)
    enrol = world.start_totp(name="sam", now=NOW)
    totp = pyotp.TOTP(enrol["secret"])
    assert world.login(name="sam", password="sam's long password", totp=None, ip=None, now=NOW).result == "ok"
    assert world.confirm_totp(name="sam", code=totp.at(NOW), ip=None, now=NOW, sign_in=False).result == "ok"
    with pytest.raises(AccountError, match="set up already"):
        world.start_totp(name="sam", now=NOW)
    later = NOW + timedelta(minutes=2)
    assert world.login(name="sam", password="sam's long password", totp=None, ip=None, now=later).result == "refused"
    assert world.login(name="sam", password="sam's long password", totp=totp.at(later), ip=None, now=later).result == "ok"


def test_totp_counter_window_and_replay():
    secret = pyotp.random_base32()
    totp = pyotp.TOTP(secret)
    step = totp.timecode(NOW)
    assert totp_counter(secret, totp.at(NOW), NOW, None) == step
    assert totp_counter(secret, totp.at(NOW - timedelta(seconds=30)), NOW, None) == step - 1
    assert totp_counter(secret, totp.at(NOW - timedelta(seconds=90)), NOW, None) is None
    assert totp_counter(secret, totp.at(NOW), NOW, step) is None


def test_closed_and_unverified_sessions_are_refused(world, sessions):
    assert world.session(name="sam", now=NOW).result == "ok"
    ops.set_user_state(sessions, OP, "sam", "closed", now=NOW)
    out = world.session(name="sam", now=NOW)
    assert (out.result, out.decision.rule, out.decision.reason) == ("refused", "account.state", "your account is closed")
    assert events(sessions, "account.session")[-1].rule == "account.state"
    with sessions.begin() as s:
        inst = ops.get_institution(s, "Uni")
        inst.verified = False
    assert world.session(name="pat", now=NOW).decision.rule == "signin.institution"


def test_identity_provider_sign_in_needs_the_claim(world, sessions):
    idp = "https://idp.uni.example"
    kw = dict(idp=idp, subject="u-1", username="nina", display_name="Nina N", email="nina@uni.example",
              ip="10.9.8.7", now=NOW)
    # a matching e-mail domain without the institution claim proves nothing (CVE-2022-31027)
    none = world.idp_login(claims=[], **kw)
    assert (none.result, none.decision.rule) == ("refused", "signin.institution")
    with sessions() as s:
        assert s.scalar(select(User).where(User.name == "nina")) is None
    # the IdP may vouch only for its own institution
    other = world.idp_login(claims=["other.example"], **kw)
    assert other.decision.rule == "signin.institution" and "not registered" in other.decision.reason
    ok = world.idp_login(claims=["staff@other.example", "uni.example"], **kw)
    assert ok.result == "ok" and ok.account["institution"] == "Uni" and ok.account["pi_verified"]
    with sessions() as s:
        user = s.scalar(select(User).where(User.name == "nina"))
        assert (user.state.value, user.last_login_ip) == ("active", "10.9.8.7")
        ident = s.scalar(select(ExternalIdentity).where(ExternalIdentity.user_id == user.id))
        assert (ident.idp, ident.subject, ident.claims) == (idp, "u-1", {"institution": "uni.example"})
    # the same identity signs in to the same account, whatever name it suggests now
    again = world.idp_login(claims=["uni.example"], **{**kw, "username": "someone-else"})
    assert again.account["name"] == "nina"
    # refresh: the membership is re-checked with the current claims
    assert world.idp_login(claims=["uni.example"], refresh=True, **kw).result == "ok"
    gone = world.idp_login(claims=[], refresh=True, **kw)
    assert gone.result == "refused"
    # a name taken by a local account is not taken over
    with pytest.raises(AccountError, match="another person"):
        world.set_password("sam", "sam's long password", NOW)
        world.idp_login(claims=["uni.example"], **{**kw, "subject": "u-2", "username": "sam"})
    # an operator-made account without password or identity is linked on first sign-in
    linked = world.idp_login(claims=["uni.example"], **{**kw, "subject": "u-3", "username": "pat"})
    assert linked.account["name"] == "pat"
    with sessions() as s:
        assert {e.details.get("created") for e in events(sessions, "account.sign_in") if e.allowed} == {True, False}


def test_default_hash_parameters_are_rfc9106(sessions):
    acc = Accounts(sessions)
    h = acc.hash_password("a long enough password")
    assert h.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert acc.verify_password(h, "a long enough password") and not acc.verify_password(h, "wrong")
    assert not acc.verify_password(None, "a long enough password")
