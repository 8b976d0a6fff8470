"""A small, real OpenID Connect provider on 127.0.0.1 for the OAuth tests, built on authlib.

Authorization endpoint (a login form, then the code), token endpoint (client_secret_basic or
_post, RS256-signed id_token), userinfo endpoint (bearer token) and the discovery document.
Users are plain dicts of claims with a password; the claims are what the identity provider
asserts (e.g. ``schacHomeOrganization``), and tests change them between sign-ins.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlencode, urlparse

from authlib.oauth2.rfc6749 import AuthorizationServer, OAuth2Request, grants
from authlib.oauth2.rfc6749.models import AuthorizationCodeMixin, ClientMixin
from authlib.oauth2.rfc6749.requests import BasicOAuth2Payload
from authlib.oauth2.rfc6750 import BearerTokenGenerator
from authlib.oidc.core.grants import OpenIDCode
from joserfc.jwk import RSAKey


@dataclass
class Client(ClientMixin):
    client_id: str
    client_secret: str
    redirect_uris: list[str]

    def get_client_id(self):
        return self.client_id

    def get_default_redirect_uri(self):
        return self.redirect_uris[0]

    def get_allowed_scope(self, scope):
        return " ".join(s for s in (scope or "").split() if s in ("openid", "profile", "email", "schac"))

    def check_redirect_uri(self, redirect_uri):
        return redirect_uri in self.redirect_uris

    def check_client_secret(self, client_secret):
        return secrets.compare_digest(client_secret, self.client_secret)

    def check_endpoint_auth_method(self, method, endpoint):
        return method in ("client_secret_basic", "client_secret_post")

    def check_response_type(self, response_type):
        return response_type == "code"

    def check_grant_type(self, grant_type):
        return grant_type == "authorization_code"


@dataclass
class Code(AuthorizationCodeMixin):
    code: str
    client_id: str
    redirect_uri: str
    scope: str
    user: str
    nonce: str | None = None
    auth_time: int = field(default_factory=lambda: int(time.time()))

    def get_redirect_uri(self):
        return self.redirect_uri

    def get_scope(self):
        return self.scope

    def get_nonce(self):
        return self.nonce

    def get_auth_time(self):
        return self.auth_time

    def get_acr(self):
        return None

    def get_amr(self):
        return None


class Request(OAuth2Request):
    def __init__(self, method: str, uri: str, headers: dict, query: dict, form: dict):
        super().__init__(method, uri, headers=headers)
        self._query, self._form = query, form
        self.payload = BasicOAuth2Payload({**query, **form})

    @property
    def args(self):
        return self._query

    @property
    def form(self):
        return self._form


class Provider(AuthorizationServer):
    """The identity provider: ``users`` maps a login name to {"password", "claims"}."""

    def __init__(self, client_id: str, client_secret: str, redirect_uri: str = ""):
        super().__init__(scopes_supported=["openid", "profile", "email", "schac"])
        self.users: dict[str, dict] = {}
        self.client = Client(client_id, client_secret, [redirect_uri] if redirect_uri else [])
        self.codes: dict[str, Code] = {}
        self.tokens: dict[str, dict] = {}
        self.key = RSAKey.generate_key(2048, private=True, parameters={"kid": "test"})
        self.userinfo_calls = 0
        self.register_token_generator("default", BearerTokenGenerator(
            access_token_generator=lambda **kw: secrets.token_urlsafe(24),
            refresh_token_generator=None))
        provider = self

        class OIDCCode(OpenIDCode):
            def resolve_client_private_key(self, client):
                return provider.key

            def get_client_algorithm(self, client):
                return "RS256"

            def get_client_claims(self, client):
                return {"iss": provider.issuer, "aud": [client.get_client_id()]}

            def exists_nonce(self, nonce, request):
                return False

            def generate_user_info(self, user, scope):
                return {"sub": provider.users[user]["claims"]["sub"]}

        class CodeGrant(grants.AuthorizationCodeGrant):
            TOKEN_ENDPOINT_AUTH_METHODS = ["client_secret_basic", "client_secret_post"]

            def save_authorization_code(self, code, request):
                provider.codes[code] = Code(code, request.client.get_client_id(), request.payload.redirect_uri,
                                            request.scope, request.user, request.payload.data.get("nonce"))

            def query_authorization_code(self, code, client):
                item = provider.codes.get(code)
                return item if item and item.client_id == client.get_client_id() else None

            def delete_authorization_code(self, authorization_code):
                provider.codes.pop(authorization_code.code, None)

            def authenticate_user(self, authorization_code):
                return authorization_code.user

        self.register_grant(CodeGrant, [OIDCCode(require_nonce=False)])
        self.httpd: ThreadingHTTPServer | None = None

    # authlib's framework hooks ------------------------------------------------------------
    def query_client(self, client_id):
        return self.client if client_id == self.client.client_id else None

    def save_token(self, token, request):
        self.tokens[token["access_token"]] = {"user": request.user, "scope": token.get("scope", "")}

    def create_oauth2_request(self, request):
        return request

    def create_json_request(self, request):
        return request

    def handle_response(self, status, body, headers):
        return status, body, headers

    def send_signal(self, name, *args, **kwargs):
        pass

    # the HTTP server ----------------------------------------------------------------------
    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> Provider:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _request(self) -> Request:
                parsed = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode() if length else ""
                return Request(self.command, provider.issuer + self.path, dict(self.headers),
                               dict(parse_qsl(parsed.query)), dict(parse_qsl(body)))

            def _send(self, status, body, headers):
                data = body if isinstance(body, bytes) else (
                    json.dumps(body).encode() if isinstance(body, dict) else str(body).encode())
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802 - http.server's hook names
                req = self._request()
                path = urlparse(self.path).path
                if path == "/.well-known/openid-configuration":
                    self._send(200, provider.discovery(), [("Content-Type", "application/json")])
                elif path == "/authorize":
                    form = ("<form method='post'><input name='username'><input name='password' type='password'>"
                            "<input type='submit' value='Sign in'></form>")
                    self._send(200, form, [("Content-Type", "text/html")])
                elif path == "/userinfo":
                    provider.userinfo_calls += 1
                    auth = req.headers.get("Authorization", "")
                    token = provider.tokens.get(auth.partition(" ")[2]) if auth.lower().startswith("bearer ") else None
                    if token is None:
                        self._send(401, {"error": "invalid_token"}, [("Content-Type", "application/json")])
                        return
                    claims = provider.users[token["user"]]["claims"]
                    self._send(200, dict(claims), [("Content-Type", "application/json")])
                else:
                    self._send(404, {"error": "not found"}, [("Content-Type", "application/json")])

            def do_POST(self):  # noqa: N802
                req = self._request()
                path = urlparse(self.path).path
                if path == "/authorize":
                    user = provider.users.get(req.form.get("username", ""))
                    if user is None or not secrets.compare_digest(user["password"], req.form.get("password", "")):
                        self._send(403, "wrong user name or password", [("Content-Type", "text/plain")])
                        return
                    grant = provider.get_consent_grant(req, end_user=req.form["username"])
                    self._send(*provider.create_authorization_response(req, grant_user=req.form["username"],
                                                                        grant=grant))
                elif path == "/token":
                    self._send(*provider.create_token_response(req))
                else:
                    self._send(404, {"error": "not found"}, [("Content-Type", "application/json")])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()

    def discovery(self) -> dict:
        return {"issuer": self.issuer, "authorization_endpoint": self.issuer + "/authorize",
                "token_endpoint": self.issuer + "/token", "userinfo_endpoint": self.issuer + "/userinfo",
                "response_types_supported": ["code"], "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"]}

    def authorize_form_action(self, authorize_url: str) -> str:
        """Where the login form at ``authorize_url`` posts to (the same URL)."""
        return authorize_url


def query(url: str) -> dict:
    return dict(parse_qsl(urlparse(url).query))


__all__ = ["Provider", "query", "urlencode"]
