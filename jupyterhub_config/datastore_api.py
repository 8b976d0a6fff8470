"""How the Hub (authenticator, spawner, reconciler) talks to the datastore service.

The Hub holds no database URL and no keys: it asks the service's Hub-internal API
(``…/api/v1/hub/…``) with the secret it shares with the service (``LABVAULT_HUB_SECRET``).
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import quote

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest
from traitlets import Float, Unicode, default
from traitlets.config import LoggingConfigurable


class DatastoreUnavailable(Exception):
    """The service could not be reached or failed (5xx)."""


class DatastoreRefused(Exception):
    """The service answered with a 4xx: ``status``, ``error``, ``rule``, ``reason``."""

    def __init__(self, status: int, error: str, rule: str, reason: str):
        super().__init__(f"{status} {error}: {reason}")
        self.status, self.error, self.rule, self.reason = status, error, rule, reason


class DatastoreAPI(LoggingConfigurable):
    """The Hub's client of the datastore service (asynchronous, Tornado's HTTP client)."""

    url = Unicode(
        help="""The datastore service's URL as the Hub reaches it, up to its prefix
        (e.g. ``http://127.0.0.1:8890/services/labvault``). Default: $LABVAULT_SERVICE_URL.""",
    ).tag(config=True)

    @default("url")
    def _default_url(self):
        return os.environ.get("LABVAULT_SERVICE_URL", "http://127.0.0.1:8890/services/labvault")

    secret = Unicode(
        help="""The secret shared with the service's Hub-internal API. Default: $LABVAULT_HUB_SECRET.
        Never put it in a config file that users can read.""",
    ).tag(config=True)

    @default("secret")
    def _default_secret(self):
        return os.environ.get("LABVAULT_HUB_SECRET", "")

    timeout = Float(10.0, help="Seconds to wait for the datastore service.").tag(config=True)

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        """Call ``/api/v1/hub`` + ``path``; return the JSON answer or raise."""
        url = self.url.rstrip("/") + "/api/v1/hub" + path
        req = HTTPRequest(
            url, method=method,
            headers={"Authorization": f"labvault-hub {self.secret}", "Content-Type": "application/json"},
            body=json.dumps(body) if body is not None else (b"" if method in ("POST", "PUT", "PATCH") else None),
            request_timeout=self.timeout, connect_timeout=self.timeout,
        )
        try:
            resp = await AsyncHTTPClient().fetch(req)
        except HTTPClientError as e:
            if e.response is None or e.code >= 500:
                raise DatastoreUnavailable(f"datastore service: {e}") from None
            try:
                err = json.loads(e.response.body)
            except ValueError:
                err = {}
            raise DatastoreRefused(e.code, err.get("error", str(e)), err.get("rule", ""),
                                   err.get("reason", str(e))) from None
        except OSError as e:
            raise DatastoreUnavailable(f"datastore service unreachable: {e}") from None
        return json.loads(resp.body) if resp.body else None

    async def user(self, name: str) -> dict:
        return await self.request("GET", f"/users/{quote(name, safe='')}")
