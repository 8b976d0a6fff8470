"""LabvaultAuthenticator (local accounts) in a real JupyterHub, driven over HTTP with cookies.

One Hub (with the datastore service it manages) per database kind, a real SMTP server
(aiosmtpd on loopback) receiving the confirmation mails, TOTP codes from pyotp. Sign up →
mail → confirm → sign in; tentative, deactivated, closed and unverified-institution accounts
get a refusal page; a PI sets up TOTP at the first sign-in; lockout; a closed account's session
and tokens end through refresh_user; and the Hub's logs carry no full client address.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from datetime import datetime, timedelta, timezone

import pyotp
import pytest
import requests
from conftest import fresh_database_url
from hubtools import start_hub
from sqlalchemy import select

from labvault.datastore import demo
from labvault.datastore import operations as ops
from labvault.datastore.accounts import Accounts, LocalAccounts
from labvault.datastore.db import make_engine, session_factory
from labvault.datastore.mail import LocalMailbox
from labvault.datastore.models import AuditEvent, LocalCredential, User

pytestmark = pytest.mark.slow
NOW = datetime.now(timezone.utc).replace(microsecond=0)
OP = ops.Actor(operator="test")
PASSWORDS = {"alice": "alice's long password", "bob": "bob's long password",
             "carol": "carol's long password", "vera": "vera's long password",
             "ulla": "ulla's long password"}
FAST = "c.LocalAccounts.argon2_time_cost = 1\nc.LocalAccounts.argon2_memory_kib = 8192\n"


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def hub(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(f"hub-auth-{request.param}")
    url = fresh_database_url(request, request.param, workdir)
    engine = make_engine(url)
    factory = session_factory(engine)
    demo.seed(factory, OP, now=NOW)
    ops.add_institution(factory, OP, "Shady Institute", domains=["shady.example"], verified=False)
    ops.add_user(factory, OP, "ulla", institution="Shady Institute")
    accounts = Accounts(factory, LocalAccounts(argon2_time_cost=1, argon2_memory_kib=8192))
    for name, password in PASSWORDS.items():
        accounts.set_password(name, password, NOW)
    mailbox = LocalMailbox(workdir / "mail").start()
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    (data / "labvault_config.py").write_text(
        f"c.Mailer.smtp_port = {mailbox.port}\n" + FAST + "c.Policy.signin_lockout_attempts = 3\n")
    h = start_hub(workdir, url, now=NOW, service_config=f"""
import os
os.environ.setdefault("JUPYTERHUB_CRYPT_KEY", {secrets.token_hex(32)!r})
c.JupyterHub.authenticator_class = "labvault"
c.JupyterHub.redirect_to_server = False
c.Authenticator.auth_refresh_age = 1
c.JupyterHub.load_roles.append({{"name": "auth-state-reader", "services": ["test-admin"],
                                 "scopes": ["admin:auth_state", "read:users"]}})
""")
    h.factory, h.mailbox = factory, mailbox
    yield h
    h.stop()
    mailbox.stop()
    engine.dispose()


@pytest.fixture
def clock(hub):
    """The service's clock, put back afterwards."""
    hub.set_clock(NOW)
    yield hub.set_clock
    hub.set_clock(NOW)


class Browser:
    """A person at a browser: cookies kept, redirects looked at one by one."""

    def __init__(self, hub):
        self.hub, self.s = hub, requests.Session()

    def get(self, path, **kw):
        return self.s.get(self.hub.url + path if path.startswith("/") else path, allow_redirects=False,
                          timeout=30, **kw)

    def post(self, path, data, **kw):
        return self.s.post(self.hub.url + path if path.startswith("/") else path, data=data,
                           allow_redirects=False, timeout=30, **kw)

    def form(self, path):
        """GET a page with a form; its _xsrf value (the cookie comes with the page)."""
        r = self.get(path)
        assert r.status_code == 200, (path, r.status_code, r.text[:500])
        return r, re.search(r'name="_xsrf" value="([^"]+)"', r.text).group(1)

    def login(self, name, password, otp=""):
        _, xsrf = self.form("/hub/login")
        return self.post("/hub/login", {"_xsrf": xsrf, "username": name, "password": password, "otp": otp})

    def signed_in_as(self):
        r = self.get("/hub/home")
        if r.status_code != 200:
            return None
        return re.search(r'<span class="me-1">([^<]+)</span>', r.text).group(1)


def refusal(r):
    """(status, rule, reason) of a refusal page."""
    rule = re.search(r'<code id="labvault-rule">([^<]+)</code>', r.text)
    reason = re.search(r'<p id="labvault-reason">([^<]+)</p>', r.text)
    return r.status_code, rule and rule.group(1), reason and reason.group(1).replace("&#39;", "'")


def login_error(r):
    m = re.search(r'<p class="login_error">([^<]+)</p>', r.text)
    return m and m.group(1).replace("&#39;", "'")


def user_row(hub, name):
    with hub.factory() as s:
        return s.scalar(select(User).where(User.name == name))


def auth_state(hub, name):
    r = hub.hub_request("GET", f"/users/{name}")
    assert r.status == 200, r.data
    return json.loads(r.data)["auth_state"]


def test_signup_mail_confirm_and_sign_in(hub):
    b = Browser(hub)
    page, xsrf = b.form("/hub/labvault/signup")
    assert "Alpine University" in page.text and "Shady Institute" not in page.text  # verified only
    form = {"_xsrf": xsrf, "username": "dora", "display_name": "Dora Dietrich", "institution": "Alpine University",
            "email": "dora@alpine-uni.example", "password": "dora's long password",
            "password2": "dora's long password", "adult": "yes"}
    r = b.post("/hub/labvault/signup", form)
    assert r.status_code == 200 and "Check your e-mail" in r.text
    msg = hub.mailbox.wait_for(lambda m: m["To"] == "dora@alpine-uni.example")
    link = msg["X-Labvault-Confirmation-Link"]
    assert link.startswith(hub.url + "/hub/labvault/confirm?token=") and link in msg.get_content()
    assert user_row(hub, "dora").state.value == "tentative"
    # tentative: a clear refusal page, not a login
    r = Browser(hub).login("dora", "dora's long password")
    status, rule, reason = refusal(r)
    assert (status, rule) == (403, "account.state") and "open the link" in reason
    # the link: a page asking for the password (following the link alone confirms nothing)
    r = b.get(link)
    assert r.status_code == 200 and "Confirm and sign in" in r.text
    assert user_row(hub, "dora").state.value == "tentative"
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', r.text).group(1)
    token = link.split("token=", 1)[1]
    r = b.post("/hub/labvault/confirm", {"_xsrf": xsrf, "confirm_token": token, "username": "dora",
                                         "password": "wrong password!!"})
    assert r.status_code == 403 and "wrong user name or password" in r.text and "Confirm and sign in" in r.text
    r = b.post("/hub/labvault/confirm", {"_xsrf": xsrf, "confirm_token": token, "username": "dora",
                                         "password": "dora's long password"})
    assert r.status_code == 302, r.text[:500]
    assert b.signed_in_as() == "dora"
    dora = user_row(hub, "dora")
    assert dora.state.value == "active" and dora.institutional_email_verified_at is not None
    assert dora.last_login_ip == "127.0.0.1"  # full, on the account
    state = auth_state(hub, "dora")["labvault"]
    assert (state["institution"], state["is_vendor"], state["pi_verified"]) == ("Alpine University", False, True)
    # a second browser signs in with the password alone (not a PI: no second factor)
    other = Browser(hub)
    assert other.login("dora", "dora's long password").status_code == 302
    assert other.signed_in_as() == "dora"
    with hub.factory() as s:
        ips = {e.ip for e in s.scalars(select(AuditEvent).where(AuditEvent.actor == "dora"))}
    assert ips == {"127.0.x.x"}  # truncated in the audit log


def test_a_signed_in_user_may_set_up_totp(hub, clock):
    b = Browser(hub)
    assert b.login("dora", "dora's long password").status_code == 302
    r = b.get("/hub/labvault/totp")
    assert r.status_code == 200 and 'name="totp_ticket"' not in r.text
    secret = re.search(r'id="labvault-totp-secret">([A-Z2-7]+)<', r.text).group(1)
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', r.text).group(1)
    when = NOW + timedelta(minutes=5)
    clock(when)
    r = b.post("/hub/labvault/totp", {"_xsrf": xsrf, "otp": pyotp.TOTP(secret).at(when)})
    assert r.status_code == 200 and "Two-factor authentication is set up" in r.text
    # from now on dora needs the code too
    r = Browser(hub).login("dora", "dora's long password")
    assert r.status_code == 403 and "6-digit code" in login_error(r)
    later = when + timedelta(minutes=1)
    clock(later)
    assert Browser(hub).login("dora", "dora's long password", otp=pyotp.TOTP(secret).at(later)).status_code == 302
    # anonymous visitors are sent to sign in first
    r = Browser(hub).get("/hub/labvault/totp")
    assert r.status_code == 302 and "/hub/login" in r.headers["Location"]


def test_signup_refusals(hub):
    b = Browser(hub)
    _, xsrf = b.form("/hub/labvault/signup")
    base = {"_xsrf": xsrf, "username": "eric", "display_name": "Eric E", "institution": "Alpine University",
            "email": "eric@alpine-uni.example", "password": "eric's long password",
            "password2": "eric's long password", "adult": "yes"}
    for change, status, says in (({"adult": ""}, 403, "18 or older"),
                                 ({"email": "eric@gmail.example"}, 403, "verified domains"),
                                 ({"institution": "Shady Institute", "email": "eric@shady.example"}, 403,
                                  "not a verified institution"),
                                 ({"password2": "something else!!"}, 400, "passwords differ"),
                                 ({"password": "short", "password2": "short"}, 400, "at least 10"),
                                 ({"username": "bob"}, 409, "taken")):
        r = b.post("/hub/labvault/signup", {**base, **change})
        assert r.status_code == status and says in r.text.replace("&#39;", "'"), (change, r.text[-1500:])
        assert 'id="labvault-signup"' in r.text  # the form again, filled in
    assert user_row(hub, "eric") is None
    assert not [m for m in hub.mailbox.messages() if m["To"].startswith("eric@")]


def test_refusal_pages_for_inactive_accounts_and_unverified_institutions(hub):
    ops.set_user_state(hub.factory, OP, "vera", "deactivated", now=NOW)
    status, rule, reason = refusal(Browser(hub).login("vera", PASSWORDS["vera"]))
    assert (status, rule, reason) == (403, "account.state", "your account is deactivated; ask an administrator")
    status, rule, reason = refusal(Browser(hub).login("ulla", PASSWORDS["ulla"]))
    assert (status, rule) == (403, "signin.institution") and "no verified institution" in reason
    # a wrong password is a message on the login form, the same for unknown names
    r = Browser(hub).login("vera", "not vera's password")
    assert r.status_code == 403 and login_error(r) == "wrong user name or password"
    r = Browser(hub).login("nobody-at-all", "whatever it is")
    assert r.status_code == 403 and login_error(r) == "wrong user name or password"


def test_a_pi_sets_up_totp_at_the_first_sign_in(hub, clock):
    b = Browser(hub)
    r = b.login("alice", PASSWORDS["alice"])
    assert r.status_code == 200 and "Set up two-factor authentication" in r.text
    uri = re.search(r'id="labvault-otpauth" href="([^"]+)"', r.text).group(1).replace("&amp;", "&")
    totp = pyotp.parse_uri(uri)
    assert uri.startswith("otpauth://totp/labvault:alice?")
    ticket = re.search(r'name="totp_ticket" value="([^"]+)"', r.text).group(1)
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', r.text).group(1)
    assert b.signed_in_as() is None  # not yet
    form = {"_xsrf": xsrf, "totp_ticket": ticket, "provisioning_uri": uri, "secret": totp.secret}
    r = b.post("/hub/labvault/totp", {**form, "otp": "12345x"})
    assert r.status_code == 403 and "wrong or expired code" in r.text and 'id="labvault-totp"' in r.text
    # a forged ticket gets nowhere
    r = b.post("/hub/labvault/totp", {**form, "totp_ticket": ticket[:-4] + "AAAA", "otp": totp.at(NOW)})
    assert r.status_code == 403 and "took too long" in r.text
    r = b.post("/hub/labvault/totp", {**form, "otp": totp.at(NOW)})
    assert r.status_code == 302, r.text[-800:]
    assert b.signed_in_as() == "alice"
    assert auth_state(hub, "alice")["labvault"]["is_pi"] is True
    # from now on: password and code
    later = NOW + timedelta(minutes=1)
    clock(later)
    r = Browser(hub).login("alice", PASSWORDS["alice"])
    assert r.status_code == 403 and "6-digit code" in login_error(r)
    c = Browser(hub)
    assert c.login("alice", PASSWORDS["alice"], otp=totp.at(later)).status_code == 302
    assert c.signed_in_as() == "alice"
    with hub.factory() as s:
        cred = s.scalar(select(LocalCredential).join(User).where(User.name == "alice"))
        assert cred.totp_confirmed_at is not None and cred.password_hash.startswith("$argon2id$")


def test_lockout_after_repeated_failures(hub, clock):
    for i in range(2):
        r = Browser(hub).login("bob", f"wrong password {i}")
        assert login_error(r) == "wrong user name or password"
    r = Browser(hub).login("bob", "wrong password 3")
    assert r.status_code == 403 and "locked until" in login_error(r)
    r = Browser(hub).login("bob", PASSWORDS["bob"])  # the right one, while locked
    assert r.status_code == 403 and "locked until" in login_error(r)
    clock(NOW + timedelta(minutes=16))
    b = Browser(hub)
    assert b.login("bob", PASSWORDS["bob"]).status_code == 302
    assert b.signed_in_as() == "bob"
    with hub.factory() as s:
        rules = [e.rule for e in s.scalars(select(AuditEvent).where(AuditEvent.actor == "bob",
                                                                   AuditEvent.action == "account.sign_in")
                                            .order_by(AuditEvent.seq))]
    assert rules[-5:] == ["signin.credentials", "signin.credentials", "signin.lockout", "signin.lockout",
                          "signin.credentials"]


def test_closing_an_account_ends_its_session_and_tokens(hub):
    b = Browser(hub)
    assert b.login("carol", PASSWORDS["carol"]).status_code == 302
    assert b.signed_in_as() == "carol"
    token = hub.token("carol", scopes=["read:users:name!user=carol"])
    api = lambda: requests.get(hub.api + "/user", headers={"Authorization": f"token {token}"}, timeout=30)  # noqa: E731
    assert api().status_code == 200
    ops.set_user_state(hub.factory, OP, "carol", "closed", now=NOW)
    time.sleep(1.2)  # auth_refresh_age = 1 in this Hub (120 s by default)
    r = b.get("/hub/home")
    assert r.status_code == 302 and "/hub/login" in r.headers["Location"]  # the session ended
    assert api().status_code == 403  # and the stale token too (auth_refresh_strict)
    status, rule, reason = refusal(Browser(hub).login("carol", PASSWORDS["carol"]))
    assert (status, rule, reason) == (403, "account.state", "your account is closed")


def test_the_hub_logs_no_full_client_address(hub):
    log = (hub.workdir / "hub.log").read_text(errors="replace")
    request_lines = [line for line in log.splitlines() if re.search(r"\d+ (GET|POST) /hub/", line)]
    assert request_lines and all("@127.0.x.x)" in line or "@" not in line for line in request_lines)
    assert not re.search(r"(GET|POST) /hub/\S* \(\w*@127\.0\.0\.1\)", log)
    assert not re.search(r"/hub/login \(127\.0\.0\.1\)", log)  # tornado's warnings for HTTP errors


# ------------------------------------------------------------------------------------------
# the log function and filter, without a Hub
# ------------------------------------------------------------------------------------------
def test_log_request_truncates_the_address(caplog):
    from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine

    from labvault.hub.logs import log_request, mask_ips

    class FakeHandler:
        def __init__(self, status, ip, headers=None, location=None):
            line = RequestStartLine("GET", "/hub/labvault/confirm?token=s3cret", "HTTP/1.1")
            self.request = HTTPServerRequest(start_line=line, headers=HTTPHeaders(
                {"Host": "hub.example", **(headers or {})}))
            self.request.remote_ip = ip
            self._status, self.current_user = status, None
            self._headers = {"Location": location} if location else {}

        def get_status(self):
            return self._status

    with caplog.at_level(logging.DEBUG, logger="tornado.access"):
        log_request(FakeHandler(200, "192.168.17.4"))
        log_request(FakeHandler(302, "2001:db8:abcd:12::1", location="/hub/login?next=x"))
        log_request(FakeHandler(500, "10.1.2.3", {"X-Forwarded-For": "203.0.113.9, 10.1.2.3",
                                                  "Authorization": "token abc"}))
    text = caplog.text
    assert "(@192.168.x.x)" in text and "(@2001:db8:abcd::/48)" in text
    assert "192.168.17.4" not in text and "203.0.113.9" not in text and "10.1.2.3" not in text
    assert "203.0.x.x, 10.1.x.x" in text and "token [secret]" in text and "s3cret" not in text
    assert " -> /hub/login?next=x" in text
    assert mask_ips("version 6.1.1 from 10.0.0.1 and ::1") == "version 6.1.1 from 10.0.x.x and ::/48"


def test_mask_filter_on_tornado_warnings(caplog):
    from labvault.hub.logs import MaskIPFilter

    logger = logging.getLogger("labvault-test-tornado")
    logger.addFilter(MaskIPFilter())
    with caplog.at_level(logging.WARNING, logger="labvault-test-tornado"):
        logger.warning("%d %s: %s", 403, "POST /hub/login (172.16.5.4)", "refused by http://10.0.0.7:80/")
        logger.warning("Uncaught exception GET /hub/ (2001:db8:abcd:12::1)")
    assert "POST /hub/login (172.16.x.x): refused" in caplog.text and "172.16.5.4" not in caplog.text
    assert "http://10.0.0.7:80/" in caplog.text  # a server's address in a URL is not a client's
    assert "GET /hub/ (2001:db8:abcd::/48)" in caplog.text


def test_ensure_crypt_key(tmp_path):
    from labvault.hub.auth_common import ensure_crypt_key

    env: dict = {}
    key = ensure_crypt_key(tmp_path / "data", env)
    assert len(bytes.fromhex(key)) == 32 and env["JUPYTERHUB_CRYPT_KEY"] == key
    assert (tmp_path / "data" / "jupyterhub_crypt_key").stat().st_mode & 0o777 == 0o600
    assert ensure_crypt_key(tmp_path / "data", {}) == key  # kept
    assert ensure_crypt_key(tmp_path / "data", {"JUPYTERHUB_CRYPT_KEY": "abc"}) == "abc"
