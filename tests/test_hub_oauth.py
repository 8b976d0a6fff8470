"""LabvaultOAuthenticator: the whole OpenID Connect code flow in a real JupyterHub.

A real identity provider (authlib, tests/oidc_provider.py) on 127.0.0.1, a real Hub with the
datastore service, a person's browser (an HTTP client keeping cookies) following every
redirect: Hub → provider's login form → provider's redirect with the code → Hub's callback
(which exchanges the code at the token endpoint and reads the user info). Membership comes
from the institution claim of a provider registered for the institution; a matching e-mail
domain without the claim is refused (CVE-2022-31027); refresh_user ends the session of a
member the provider no longer vouches for.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from datetime import datetime, timezone

import pytest
import requests
from conftest import fresh_database_url
from hubtools import start_hub
from oidc_provider import Provider
from sqlalchemy import select

from labvault.datastore import demo
from labvault.datastore import operations as ops
from labvault.datastore.db import make_engine, session_factory
from labvault.datastore.models import (
    AuditEvent,
    ExternalIdentity,
    Institution,
    InstitutionIdentifier,
    User,
)

pytestmark = pytest.mark.slow
NOW = datetime.now(timezone.utc).replace(microsecond=0)
OP = ops.Actor(operator="test")
CLIENT_ID, CLIENT_SECRET = "labvault-hub", secrets.token_hex(16)


def person(sub, name, email, **claims):
    return {"password": f"{name}-idp-password",
            "claims": {"sub": sub, "preferred_username": name, "name": name.title(), "email": email, **claims}}


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def hub(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(f"hub-oauth-{request.param}")
    url = fresh_database_url(request, request.param, workdir)
    engine = make_engine(url)
    factory = session_factory(engine)
    demo.seed(factory, OP, now=NOW)
    idp = Provider(CLIENT_ID, CLIENT_SECRET).start()
    idp.users = {
        "dora": person("sub-dora", "dora", "dora@alpine-uni.example", schacHomeOrganization="alpine-uni.example"),
        # an address at the university's domain, but the provider does not say she is a member
        "mallory": person("sub-mallory", "mallory", "mallory@alpine-uni.example"),
        # a member of an institution this provider is not registered for
        "nils": person("sub-nils", "nils", "nils@nls.example", schacHomeOrganization="nls.example"),
        # the operator-made demo account bob (no password): linked at the first sign-in
        "bob": person("sub-bob", "bob", "bob@alpine-uni.example", schacHomeOrganization="alpine-uni.example"),
    }
    with factory.begin() as s:  # the provider is Alpine University's
        uni = s.scalar(select(Institution).where(Institution.name == demo.UNI))
        s.add(InstitutionIdentifier(institution_id=uni.id, kind="idp", value=idp.issuer))
    h = start_hub(workdir, url, now=NOW, service_config=f"""
import os
os.environ.setdefault("JUPYTERHUB_CRYPT_KEY", {secrets.token_hex(32)!r})
c.JupyterHub.authenticator_class = "labvault-oauth"
c.LabvaultOAuthenticator.client_id = {CLIENT_ID!r}
c.LabvaultOAuthenticator.client_secret = {CLIENT_SECRET!r}
c.LabvaultOAuthenticator.authorize_url = {idp.issuer + "/authorize"!r}
c.LabvaultOAuthenticator.token_url = {idp.issuer + "/token"!r}
c.LabvaultOAuthenticator.userdata_url = {idp.issuer + "/userinfo"!r}
c.LabvaultOAuthenticator.scope = ["openid", "profile", "email", "schac"]
c.Authenticator.auth_refresh_age = 1
c.JupyterHub.redirect_to_server = False
c.JupyterHub.load_roles.append({{"name": "auth-state-reader", "services": ["test-admin"],
                                 "scopes": ["admin:auth_state", "read:users"]}})
""")
    idp.client.redirect_uris = [h.url + "/hub/oauth_callback"]
    h.factory, h.idp = factory, idp
    yield h
    h.stop()
    idp.stop()
    engine.dispose()


def sign_in(hub, login: str):
    """The whole code flow in a fresh browser; returns (browser, the Hub's last answer)."""
    b = requests.Session()
    r = b.get(hub.url + "/hub/oauth_login", allow_redirects=False, timeout=30)
    assert r.status_code == 302 and r.headers["Location"].startswith(hub.idp.issuer + "/authorize?")
    authorize = r.headers["Location"]
    assert "Sign in" in b.get(authorize, timeout=30).text  # the provider's login form
    r = b.post(authorize, data={"username": login, "password": hub.idp.users[login]["password"]},
               allow_redirects=False, timeout=30)
    assert r.status_code == 302, r.text
    callback = r.headers["Location"]
    assert callback.startswith(hub.url + "/hub/oauth_callback?") and "code=" in callback
    return b, b.get(callback, allow_redirects=False, timeout=30)


def home_user(b, hub):
    r = b.get(hub.url + "/hub/home", allow_redirects=False, timeout=30)
    m = re.search(r'<span class="me-1">([^<]+)</span>', r.text) if r.status_code == 200 else None
    return m and m.group(1)


def refusal(r):
    rule = re.search(r'<code id="labvault-rule">([^<]+)</code>', r.text)
    reason = re.search(r'<p id="labvault-reason">([^<]+)</p>', r.text)
    return r.status_code, rule and rule.group(1), reason and reason.group(1).replace("&#39;", "'")


def test_the_code_flow_signs_in_a_member_the_provider_vouches_for(hub):
    b, r = sign_in(hub, "dora")
    assert r.status_code == 302, r.text[-1500:]
    assert home_user(b, hub) == "dora"
    with hub.factory() as s:
        dora = s.scalar(select(User).where(User.name == "dora"))
        assert (dora.state.value, dora.institution.name) == ("active", demo.UNI)
        assert dora.last_login_ip == "127.0.0.1" and dora.institutional_email_verified_at is not None
        ident = s.scalar(select(ExternalIdentity).where(ExternalIdentity.user_id == dora.id))
        assert (ident.idp, ident.subject) == (hub.idp.issuer, "sub-dora")
        event = s.scalars(select(AuditEvent).where(AuditEvent.actor == "dora").order_by(AuditEvent.seq.desc())).first()
        assert (event.action, event.allowed, event.rule, event.ip) == \
            ("account.sign_in", True, "signin.institution", "127.0.x.x")
    r = hub.hub_request("GET", "/users/dora")
    state = json.loads(r.data)["auth_state"]
    assert state["labvault"]["institution"] == demo.UNI and state["labvault"]["is_vendor"] is False
    assert state["labvault_identity"]["claims"] == ["alpine-uni.example"]
    assert state["access_token"]  # oauthenticator's own auth_state is kept


def test_an_email_at_the_domain_without_the_claim_is_refused(hub):
    _, r = sign_in(hub, "mallory")
    status, rule, reason = refusal(r)
    assert (status, rule) == (403, "signin.institution")
    assert "did not state which institution" in reason and "e-mail address does not prove it" in reason
    with hub.factory() as s:
        assert s.scalar(select(User).where(User.name == "mallory")) is None


def test_a_provider_not_registered_for_the_institution_is_refused(hub):
    _, r = sign_in(hub, "nils")
    status, rule, reason = refusal(r)
    assert (status, rule) == (403, "signin.institution") and "is not registered for the institution" in reason
    with hub.factory() as s:
        assert s.scalar(select(User).where(User.name == "nils")) is None


def test_an_operator_made_account_is_linked_and_closed_accounts_are_refused(hub):
    b, r = sign_in(hub, "bob")
    assert r.status_code == 302 and home_user(b, hub) == "bob"
    with hub.factory() as s:
        bob = s.scalar(select(User).where(User.name == "bob"))
        assert s.scalar(select(ExternalIdentity.subject).where(ExternalIdentity.user_id == bob.id)) == "sub-bob"
    ops.set_user_state(hub.factory, OP, "bob", "closed", now=NOW)
    try:
        time.sleep(1.2)  # auth_refresh_age = 1
        assert home_user(b, hub) is None  # the session ended
        _, r = sign_in(hub, "bob")
        assert refusal(r) == (403, "account.state", "your account is closed")
    finally:
        ops.set_user_state(hub.factory, OP, "bob", "active", now=NOW)


def test_a_member_the_provider_stops_vouching_for_loses_the_session(hub):
    b, r = sign_in(hub, "dora")
    assert home_user(b, hub) == "dora"
    calls = hub.idp.userinfo_calls
    claims = hub.idp.users["dora"]["claims"]
    claims.pop("schacHomeOrganization")  # she left the university
    try:
        time.sleep(1.2)
        r = b.get(hub.url + "/hub/home", allow_redirects=False, timeout=30)
        assert r.status_code == 302 and "/hub/login" in r.headers["Location"]
        assert hub.idp.userinfo_calls > calls  # refresh_user asked the provider again
    finally:
        claims["schacHomeOrganization"] = "alpine-uni.example"
    with hub.factory() as s:
        event = s.scalars(select(AuditEvent).where(AuditEvent.actor == "dora", AuditEvent.action == "account.session")
                          .order_by(AuditEvent.seq.desc())).first()
        assert (event.allowed, event.rule) == (False, "signin.institution")
