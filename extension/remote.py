"""The single-user server's connection to the datastore service.

It holds the user's Hub token and nothing else that grants access. Every call is a request the
service decides at that moment; the blocking client runs on a small thread pool so the server's
event loop never waits on the network. Service refusals become ``web.HTTPError`` with the
policy's reason as the message and the rule as the reason phrase.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar
from urllib.parse import quote

import urllib3
from tornado import web
from traitlets import Bool, Float, Integer, Unicode, default
from traitlets.config import LoggingConfigurable

from labvault.datastore.client import Client, LabvaultError

T = TypeVar("T")

#: Statuses of the service passed on unchanged; others are mapped (see :func:`refusal`).
_PASSED_ON = {400, 403, 404, 409, 410, 411, 413, 416, 429}


def refusal(error: LabvaultError) -> web.HTTPError:
    """The HTTP error a user's server answers with for a service refusal or failure.

    The message is the policy's reason (what JupyterLab shows); the rule travels as the reason
    phrase, and both also as ``X-Labvault-Rule`` / ``X-Labvault-Reason`` headers on the current
    handler, because jupyter_server replaces the body of a 404 to a contents GET.
    """
    reason = error.reason or error.error or "refused"
    if error.status == 0:
        status, message = 503, f"labvault is not configured in this server: {reason}"
    elif error.status == 401:
        status, message = 403, f"the labvault service did not accept this server's token: {reason}"
    elif error.status in _PASSED_ON:
        status, message = error.status, reason
    elif error.status >= 500:
        status, message = 502, f"the labvault service failed: {reason}"
    else:
        status, message = error.status, reason
    _annotate(error.rule, message)
    return web.HTTPError(status, message, reason=error.rule or None)


def refused(status: int, rule: str, message: str) -> web.HTTPError:
    """A refusal made by the extension itself (read-only tree, bad path), named like the service's."""
    _annotate(rule, message)
    return web.HTTPError(status, message, reason=rule or None)


def _annotate(rule: str, message: str) -> None:
    try:
        from jupyter_server import CallContext
    except ImportError:  # pragma: no cover - jupyter_server < 2.5
        return
    handler = CallContext.get(CallContext.JUPYTER_HANDLER)
    if handler is None or getattr(handler, "_finished", True):
        return
    if rule:
        handler.set_header("X-Labvault-Rule", rule)
    handler.set_header("X-Labvault-Reason", quote(message, safe=" ,.:;()'/-_@"))


class ServiceConnection(LoggingConfigurable):
    """One user's connection to the labvault datastore service (used by the contents manager
    and the HDF5 endpoints)."""

    service_url = Unicode(
        help="""URL of the labvault datastore service, e.g.
        ``http://127.0.0.1:8890/services/labvault``.

        Default: ``$LABVAULT_SERVICE_URL``, which the labvault spawner sets for every server;
        without it, the service path on the host of ``$JUPYTERHUB_API_URL``.
        """,
    ).tag(config=True)

    @default("service_url")
    def _default_service_url(self) -> str:
        return os.environ.get("LABVAULT_SERVICE_URL", "")

    api_token = Unicode(
        help="""The token this server sends to the service: the user's JupyterHub token.

        Default: ``$JUPYTERHUB_API_TOKEN`` (JupyterHub gives every single-user server one). The
        token needs the scope ``access:services!service=labvault``
        (``Spawner.server_token_scopes``). It is never logged.
        """,
    ).tag(config=True)

    @default("api_token")
    def _default_api_token(self) -> str:
        return os.environ.get("JUPYTERHUB_API_TOKEN", "")

    request_timeout = Float(
        60.0,
        help="""Seconds to wait for the service to answer one request before the user sees a
        503 (the service is unavailable).""",
    ).tag(config=True)

    max_threads = Integer(
        8,
        help="""Threads that carry the blocking service calls of this server (also the size of
        the connection pool). Listing and reading run there, never on the event loop.""",
    ).tag(config=True)

    direct_reads = Bool(
        help="""Read file contents through the direct path (a leased data key, ciphertext from a
        read-only mount) when the service offers it. Off: the served path (HTTP Range requests,
        decrypted by the service), which works in every deployment.

        Default: on when ``$LABVAULT_DIRECT_READ_ROOT`` is set (the labvault spawner sets it
        when it mounts the ciphertext into the server), else off.""",
    ).tag(config=True)

    @default("direct_reads")
    def _default_direct_reads(self) -> bool:
        return bool(os.environ.get("LABVAULT_DIRECT_READ_ROOT"))

    #: How many service operations this connection has started (tests and benchmarks read it).
    calls: int = 0

    _client: Client | None = None
    _executor: ThreadPoolExecutor | None = None

    @property
    def client(self) -> Client:
        """The kernel-side client, made on first use (raises 503 when nothing is configured)."""
        if self._client is None:
            try:
                self._client = Client(self.service_url or None, self.api_token or None,
                                      timeout=self.request_timeout, maxsize=self.max_threads,
                                      direct=None if self.direct_reads else False)
            except LabvaultError as e:
                raise refusal(e) from None
        return self._client

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one blocking service operation off the event loop; map its errors to HTTP."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.max_threads, thread_name_prefix="labvault")
        self.calls += 1
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, partial(fn, *args, **kwargs))
        except LabvaultError as e:
            raise refusal(e) from None
        except (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as e:
            self.log.warning("labvault service unreachable: %s", type(e).__name__)
            raise refused(503, "", "the labvault service cannot be reached right now; try again") from None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        if self._client is not None:
            self._client.http.clear()
            self._client = None
