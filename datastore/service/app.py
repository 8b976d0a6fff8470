"""The datastore service: the one enforcement point, a JupyterHub-managed Tornado service.

Written the way jupyterhub-idle-culler is: a traitlets Application that reads
``JUPYTERHUB_API_TOKEN`` / ``JUPYTERHUB_API_URL`` / ``JUPYTERHUB_SERVICE_URL`` /
``JUPYTERHUB_SERVICE_PREFIX`` when the Hub starts it, and that also runs on its own
(``labvault service --port 8890``) for tests and debugging. Every request is identified by
its Hub token, decided by :mod:`labvault.policies`, and audited.
"""

from __future__ import annotations

import os
import signal
import time
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

from tornado import httpserver, ioloop, web
from traitlets import Bool, Float, Int, TraitError, Unicode, default, validate

from labvault.datastore.cli import CommandError, LabvaultCommand
from labvault.datastore.db import make_engine, session_factory
from labvault.policies import Policy, default_policy, truncate_ip


class RateLimiter:
    """A token bucket per user: ``rate`` requests per second, bursts up to ``burst``."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: str, cost: float = 1.0) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic()
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        if tokens < cost:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - cost, now)
        return True


class DatastoreService(LabvaultCommand):
    """labvault's datastore service (JupyterHub service ``labvault``)."""

    name = "labvault-service"
    description = "Run the datastore service (normally started by JupyterHub as a managed service)."

    ip = Unicode(help="Interface to listen on (default: from $JUPYTERHUB_SERVICE_URL, else 127.0.0.1).").tag(config=True)

    @default("ip")
    def _default_ip(self):
        url = os.environ.get("JUPYTERHUB_SERVICE_URL")
        return (urlparse(url).hostname if url else None) or "127.0.0.1"

    port = Int(help="Port to listen on (default: from $JUPYTERHUB_SERVICE_URL, else 8890).").tag(config=True)

    @default("port")
    def _default_port(self):
        url = os.environ.get("JUPYTERHUB_SERVICE_URL")
        return (urlparse(url).port if url else None) or 8890

    base_url = Unicode(help="URL prefix (default: $JUPYTERHUB_SERVICE_PREFIX, else /services/labvault/).").tag(config=True)

    @default("base_url")
    def _default_base_url(self):
        return os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/services/labvault/")

    open_files = Int(64, help="Decrypting readers kept open for range requests (an LRU).").tag(config=True)

    max_body_size = Int(
        1024 * 1024,
        help="Largest JSON request body (bytes); file uploads have max_upload_size.",
    ).tag(config=True)

    max_upload_size = Int(
        1024 * 1024 * 1024,
        help="""Largest file upload through the API (bytes, default 1 GiB). Uploads stream to a
        temporary file, not memory. Larger files: `labvault ingest` on the server.""",
    ).tag(config=True)

    rate_limit_per_second = Float(
        200.0,
        help="""Requests per second each user may make (token bucket refill rate); 0 disables.

        The privacy statement: page views are counted to detect and prevent data harvesting.
        Requests over the limit get HTTP 429 and an audit event.""",
    ).tag(config=True)

    rate_limit_burst = Int(2000, help="Requests a user may make in a burst before the rate limit applies.").tag(config=True)

    lease_seconds = Int(
        300,
        help="""Lifetime of a direct-read lease of one file's data key (seconds, default 5 minutes).

        A lease is renewed only through a fresh policy decision, so access that ends also ends
        at the next renewal.""",
    ).tag(config=True)

    direct_read_root = Unicode(
        "",
        help="""Where user servers see the ciphertext store read-only (enables the direct path).

        Empty (the default) disables direct reads: every read is served (decrypted here).
        Set it only when the deployment mounts the store read-only into user servers.""",
    ).tag(config=True)

    fake_clock_file = Unicode(
        "",
        help="""FOR TESTS ONLY: read the current time (ISO 8601) from this file at each request.

        Lets end-to-end tests move time (e.g. past a facility access window) in a running
        service. Never set it in production.""",
    ).tag(config=True)

    hub_secret = Unicode(
        help="""Shared secret of the Hub-internal API (``/api/v1/hub/…``), which the Hub's
        authenticator and spawner call. Default: $LABVAULT_HUB_SECRET. Empty disables that API.
        Give it through the environment, never on a command line (the Hub logs those).""",
    ).tag(config=True)

    @default("hub_secret")
    def _default_hub_secret(self):
        return os.environ.get("LABVAULT_HUB_SECRET", "")

    lifecycle_interval = Int(
        3600,
        help="""Seconds between runs of the lifecycle job inside the service: retention expiry
        (crypto-shredding), notices to PIs and facility staff, and the account rules (tentative,
        closed, deactivated, under 18). See docs/lifecycle.md.

        Each run is one `labvault lifecycle run` at the service's clock, in a worker thread so
        requests are not held up; a run that is still busy when the next is due is not doubled,
        and a cron job running `labvault lifecycle run` at the same time waits its turn (the runs
        share a lock in the database). 0 disables the service's runs: then run the command from
        cron (at least daily, or notices come late).""",
    ).tag(config=True)

    expose_decisions = Bool(
        False,
        help="""FOR TESTS ONLY: name every (rule, allowed) decided while answering a request in
        the X-Labvault-Decisions header, so tests prove each rule is reached through HTTP.""",
    ).tag(config=True)

    trust_xheaders = Bool(
        True,
        help="Take the client address from X-Forwarded-For (set by JupyterHub's proxy).",
    ).tag(config=True)

    token_cache_seconds = Int(
        10,
        help="""How long (seconds) the service trusts the Hub's answer about a token before it asks
        the Hub again. A token the Hub revoked (an admin removed it, a user's server stopped) is
        refused at most this long afterwards. JupyterHub's own default (HubAuth.cache_max_age) is
        300 seconds, which let a revoked token read data for five more minutes. Each token costs
        one Hub API request per period. At least 1.""",
    ).tag(config=True)

    @validate("token_cache_seconds")
    def _check_token_cache(self, proposal):
        if proposal.value < 1:
            raise TraitError("token_cache_seconds must be at least 1 (HubAuth treats 0 as 'forever')")
        return proposal.value

    def now(self) -> datetime:
        if self.fake_clock_file:
            text = Path(self.fake_clock_file).read_text().strip()
            t = datetime.fromisoformat(text.replace("Z", "+00:00"))
            return t if t.tzinfo else t.replace(tzinfo=timezone.utc)
        return datetime.now(timezone.utc)

    def make_app(self) -> web.Application:
        from .handlers import API, _pattern, default_handlers
        from .hub_api import HUB_ROUTES

        self.policy: Policy = default_policy()
        self._configure_hub_auth()
        self.engine = make_engine(self.db_url)
        self.sessions = session_factory(self.engine)
        self.limiter = RateLimiter(self.rate_limit_per_second, self.rate_limit_burst)
        from labvault.datastore.store.store import ChunkStore

        self.store = ChunkStore(sessions=self.sessions, parent=self, data_dir=self.data_dir)
        self._readers: OrderedDict[int, object] = OrderedDict()
        self._read_windows: dict[tuple[int, int], float] = {}
        base = "/" + self.base_url.strip("/") + "/"
        routes = default_handlers + [(API + _pattern(t), cls) for t, cls in HUB_ROUTES]
        handlers = [(base.rstrip("/") + path, cls) for path, cls in routes]
        return web.Application(
            handlers,
            labvault=self,
            log_function=self.log_request,
            default_handler_class=_NotFound,
            compress_response=False,
            xsrf_cookies=False,
        )

    def _configure_hub_auth(self) -> None:
        """The handlers' HubAuth (a singleton) forgets a token's answer after token_cache_seconds."""
        from jupyterhub.services.auth import HubAuth

        hub_auth = HubAuth.instance()
        hub_auth.cache_max_age = self.token_cache_seconds
        hub_auth.cache = type(hub_auth.cache)(self.token_cache_seconds)

    def reader(self, file_id: int):
        """An open decrypting reader of a stored file, kept for the next range requests."""
        reader = self._readers.get(file_id)
        if reader is None:
            reader = self.store.open(file_id)
            self._readers[file_id] = reader
            while len(self._readers) > self.open_files:
                self._readers.popitem(last=False)[1].close()
        else:
            self._readers.move_to_end(file_id)
        return reader

    def forget_reader(self, file_id: int) -> None:
        reader = self._readers.pop(file_id, None)
        if reader is not None:
            reader.close()

    def open_read_window(self, user_id: int, file_id: int) -> bool:
        """True when a user's read of a file starts a new audit window (one event per file
        opened per window; every request is still decided)."""
        key = (user_id, file_id)
        now = time.monotonic()
        if self._read_windows.get(key, 0.0) > now:
            return False
        if len(self._read_windows) > 100_000:
            self._read_windows = {k: t for k, t in self._read_windows.items() if t > now}
        self._read_windows[key] = now + self.lease_seconds
        return True

    def start_lifecycle(self) -> ioloop.PeriodicCallback | None:
        """Run the lifecycle job every ``lifecycle_interval`` seconds (0: never)."""
        if self.lifecycle_interval <= 0:
            return None
        from labvault.datastore.lifecycle import LifecycleJob
        from labvault.datastore.mail import Mailer

        self._lifecycle_job = LifecycleJob(self.sessions, store=self.store, mailer=Mailer(parent=self),
                                           policy=self.policy, parent=self)
        self._lifecycle_future = None
        timer = ioloop.PeriodicCallback(self._lifecycle_tick, self.lifecycle_interval * 1000, jitter=0.05)
        timer.start()
        return timer

    def _lifecycle_tick(self) -> None:
        if self._lifecycle_future is not None and not self._lifecycle_future.done():
            return  # the last run is still going
        loop = ioloop.IOLoop.current()
        self._lifecycle_future = loop.run_in_executor(None, self._lifecycle_run)

    def _lifecycle_run(self) -> None:
        from labvault.datastore.lifecycle import LifecycleBusy

        try:
            report = self._lifecycle_job.run(self.now())
        except LifecycleBusy as e:
            self.log.info("lifecycle: %s; skipped", e)
            return
        except Exception:  # the next tick tries again; the service goes on serving
            self.log.exception("lifecycle: the run failed")
            return
        for line in report.errors:
            self.log.warning("lifecycle: %s", line)

    def log_request(self, handler: web.RequestHandler) -> None:
        """Access log without full IPs, query strings (tokens!) or bodies."""
        status = handler.get_status()
        ms = 1000.0 * handler.request.request_time()
        user = getattr(handler, "lv_user_name", "-")
        log = self.log.info if status < 400 else self.log.warning
        if status >= 500:
            log = self.log.error
        log("%d %s %s %s %s %.1fms", status, handler.request.method, handler.request.path,
            user, truncate_ip(handler.request.remote_ip), ms)

    def run(self):
        if not self.db_url:
            raise CommandError("no database configured")
        app = self.make_app()
        server = httpserver.HTTPServer(app, xheaders=self.trust_xheaders, max_body_size=self.max_body_size)
        server.listen(self.port, self.ip)
        self.log.info("labvault datastore service on http://%s:%d%s", self.ip, self.port, self.base_url)
        lifecycle = self.start_lifecycle()
        loop = ioloop.IOLoop.current()

        def stop(signum, _frame):
            self.log.info("labvault datastore service stopping (signal %d)", signum)
            loop.add_callback_from_signal(loop.stop)

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        loop.start()
        if lifecycle is not None:
            lifecycle.stop()
        server.stop()
        self.engine.dispose()


class _NotFound(web.RequestHandler):
    def prepare(self):
        self.set_status(404)
        self.set_header("Content-Type", "application/json")
        self.finish({"error": "not found", "rule": "default.deny", "reason": f"no such endpoint: {self.request.path}"})


def main(argv=None):
    DatastoreService.launch_instance(argv)


if __name__ == "__main__":
    main()
