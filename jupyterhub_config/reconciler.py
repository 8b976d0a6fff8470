"""The Hub-side reconciler: stop a server whose set of permitted experiments shrank.

Every read through the service is decided at that moment, so revocation reaches kernels at
their next request. Two things outlive a single request, though: the read-only ciphertext
mounts of Docker/Kubernetes servers and the data-key leases of the direct read path. So the
Hub compares, for each running labvault server, the experiments it started with against the
ones its user may read now (asking the datastore service), and stops the server when any is
gone: a revoked role, facility access that ended on day 30, a closed account, or an
environment the user may no longer use (its licence expired).

It runs inside the Hub as a periodic callback: the spawner's own poll loop
(``Spawner.poll_and_notify``, every ``Spawner.poll_interval`` seconds), throttled to
:attr:`ServerReconciler.interval` per server. Why not a separate Hub-managed service like
jupyterhub-idle-culler: the reconciler needs each server's starting set, which lives in that
server's spawner state; a service would need a Hub token with ``admin:server_state`` (every
server's state) and ``servers`` (stop anyone's server) for what the spawner already knows.
Here it needs no extra credential, survives Hub restarts with the spawner state, and works the
same for the local, Docker and Kubernetes spawners.

The stop is reported to the service, which records an audit event (``server.stop``, with the
rule that ended the access) and a notice in the outbox in one transaction, and mails the user.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from urllib.parse import quote

from traitlets import Bool, Float
from traitlets.config import LoggingConfigurable

from .datastore_api import DatastoreRefused, DatastoreUnavailable


@dataclass(frozen=True)
class Verdict:
    """What changed for one server since it started."""

    lost: tuple[str, ...] = ()  # experiments it started with and may no longer read
    environment_rule: str = ""  # set when the environment may no longer be used
    environment_reason: str = ""
    inactive: bool = False  # the account is no longer active
    gained: tuple[str, ...] = field(default=(), compare=False)  # informational only

    @property
    def stop(self) -> bool:
        return bool(self.lost or self.environment_reason or self.inactive)


def compare(started: list[str] | tuple[str, ...], now: dict) -> Verdict:
    """Compare a server's starting set with the service's answer of
    ``GET /hub/users/{name}/experiments?environment=E`` (pure; unit-tested)."""
    current = {e["exid"] for e in now.get("experiments", [])}
    env = now.get("environment") or {}
    env_reason = env.get("reason", "") if env and not env.get("usable", False) else ""
    # an environment the user may no longer use reaches nothing: that is the one reason then
    lost = () if env_reason else tuple(sorted(set(started) - current))
    gained = tuple(sorted(current - set(started)))
    inactive = not now.get("active", True)
    return Verdict(lost=lost, environment_rule=env.get("rule", "") if env_reason else "",
                   environment_reason=env_reason, inactive=inactive, gained=gained)


class ServerReconciler(LoggingConfigurable):
    """Stops labvault servers whose permitted experiments shrank (see the module docstring)."""

    enabled = Bool(
        True,
        help="""Check running servers against the policy and stop those whose set of permitted
        experiments shrank. Turning this off leaves revocation to the per-request decisions of
        the service only (mounted ciphertext and key leases then outlive a revocation).""",
    ).tag(config=True)

    interval = Float(
        60.0,
        help="""Seconds between two checks of one server. Checks run on the spawner's poll
        (``Spawner.poll_interval``, 30 s by default), so the effective period is the larger of
        the two. Each check is one request to the datastore service.""",
    ).tag(config=True)

    notify = Bool(
        True,
        help="""Report each stop to the datastore service, which audits it and mails the user a
        notice naming the experiments and the rule that ended the access.""",
    ).tag(config=True)

    async def reconcile(self, spawner) -> Verdict | None:
        """Check ``spawner`` if it is due; stop it (and report) when its set shrank.
        Returns the verdict when a check ran, None otherwise."""
        if not self.enabled or not getattr(spawner, "labvault_environment", ""):
            return None
        if getattr(spawner, "_labvault_checking", False):
            return None
        last = getattr(spawner, "_labvault_last_check", 0.0)
        if time.monotonic() - last < self.interval:
            return None
        spawner._labvault_checking = True
        try:
            return await self._check(spawner)
        finally:
            spawner._labvault_last_check = time.monotonic()
            spawner._labvault_checking = False

    async def _check(self, spawner) -> Verdict | None:
        name = spawner.user.name
        env = spawner.labvault_environment
        started = list(spawner.labvault_experiments)
        started_at = spawner.labvault_started_at
        path = f"/users/{quote(name, safe='')}/experiments?environment={quote(env, safe='')}"
        try:
            answer = await spawner.datastore.request("GET", path)
        except DatastoreUnavailable as e:
            # Reads still need the service, which decides each one: keep the server, try later.
            self.log.warning("reconciler: cannot check %s (%s); will retry", spawner._log_name, e)
            return None
        except DatastoreRefused as e:
            if e.status != 404:
                self.log.error("reconciler: the service refused to check %s: %s", spawner._log_name, e)
                return None
            answer = {"active": False, "experiments": []}  # the labvault account is gone
        verdict = compare(started, answer)
        if not verdict.stop:
            return verdict
        self.log.warning(
            "reconciler: stopping %s: lost %s%s%s", spawner._log_name, ", ".join(verdict.lost) or "-",
            f"; environment {env}: {verdict.environment_reason}" if verdict.environment_reason else "",
            "; account not active" if verdict.inactive else "",
        )
        await spawner.stop()
        if self.notify:
            await self._report(spawner, name, env, started_at, verdict)
        return verdict

    async def _report(self, spawner, name: str, env: str, started_at: str, verdict: Verdict) -> None:
        body = {"server": spawner.name, "environment": env, "lost": list(verdict.lost), "started_at": started_at,
                "environment_reason": verdict.environment_reason,
                "environment_rule": verdict.environment_rule or None}
        if verdict.inactive and not verdict.lost and not verdict.environment_reason:
            body["environment_reason"] = "your account is no longer active"
            body["environment_rule"] = "account.state"
        try:
            await spawner.datastore.request("POST", f"/users/{quote(name, safe='')}/server-stopped", body)
        except (DatastoreUnavailable, DatastoreRefused) as e:
            self.log.error("reconciler: stopped %s but could not record the notice: %s", spawner._log_name, e)
