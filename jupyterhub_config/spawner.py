"""The licensed-environment spawner: a ``Configurable`` mixin and its local-process composition.

:class:`LicensedEnvironmentMixin` adds to any JupyterHub spawner what labvault needs:

- an options form listing only the environments the user may start (the datastore service
  decides with the policy: ``environment.licensed``, ``environment.proprietary_institution_only``);
- ``apply_user_options`` (JupyterHub >= 5.3) that re-validates the choice with the service, so a
  forged or unlicensed choice is refused (HTTP 400 / 403) and the start is audited;
- the server's environment: the service URL and a Hub token scoped to the service, the allowed
  kernel names, and never a database URL, the Hub's secret or a key;
- the experiments the server may reach (for Docker/Kubernetes: read-only ciphertext mounts),
  remembered in the spawner state for :mod:`labvault.hub.reconciler`, which stops the server
  when that set shrinks.

It is composed with LocalProcessSpawner here (``labvault-local``), with DockerSpawner in
:mod:`labvault.hub.docker` and KubeSpawner in :mod:`labvault.hub.kube`; importing this module
never imports docker or kubernetes.
"""

from __future__ import annotations

import fnmatch
import html
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import quote

from jupyterhub.spawner import LocalProcessSpawner
from tornado import web
from traitlets import Bool, Dict, Instance, Int, List, Unicode, default
from traitlets.config import Configurable

from .datastore_api import DatastoreAPI, DatastoreRefused, DatastoreUnavailable
from .reconciler import ServerReconciler

ENV_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")

#: Never in a user server's environment (fnmatch patterns on variable names).
FORBIDDEN_ENV = [
    "LABVAULT_HUB_SECRET",
    "LABVAULT_DB_URL",
    "LABVAULT_*KEY*",
    "LABVAULT_SMTP_PASSWORD",
    "JUPYTERHUB_CRYPT_KEY",
    "CONFIGPROXY_AUTH_TOKEN",
    "*_CLIENT_SECRET",
]


@dataclass(frozen=True)
class ReadOnlyMount:
    """One stored object of a permitted experiment, mounted read-only into the server.

    ``location``: the storage location's name; ``object``: the object's key inside it
    (``ab/<uuid>.lvc``); ``target``: where the server sees it (``<direct_read_root>/<location>/<object>``,
    where the kernel-side client looks for it).
    """

    exid: str
    location: str
    object: str
    target: str


class LicensedEnvironmentMixin(Configurable):
    """labvault's environments, mounts, server environment and reconciliation for a spawner.

    Compose it before a JupyterHub spawner class:
    ``class MySpawner(LicensedEnvironmentMixin, LocalProcessSpawner)``.
    """

    service_name = Unicode(
        "labvault",
        help="""Name of the datastore service in ``c.JupyterHub.services``. The server's
        ``$JUPYTERHUB_API_TOKEN`` gets the scope ``access:services!service=<this>``, which is
        what the service accepts (the users must hold it too: give the ``user`` role that scope
        in ``c.JupyterHub.load_roles``).""",
    ).tag(config=True)

    service_url = Unicode(
        help="""URL of the datastore service as user servers reach it, up to its prefix
        (``$LABVAULT_SERVICE_URL`` in the server). Default: the Hub's own
        (``DatastoreAPI.url``). Set it when servers reach the service by another name, e.g.
        ``http://hub:8890/services/labvault`` from containers.""",
    ).tag(config=True)

    default_environment = Unicode(
        "",
        help="""Environment started when none is chosen (a spawn through the REST API without
        options, or a form without a choice). Empty: the first environment the user may use,
        in catalogue order. It is checked like any choice.""",
    ).tag(config=True)

    mount_experiments = Bool(
        True,
        help="""Mount the ciphertext of the experiments the user may read, read-only, where the
        direct read path looks for it (``DatastoreService.direct_read_root``). Only the Docker and
        Kubernetes spawners mount; without a ``direct_read_root`` on the service nothing is
        mounted and every read is served.""",
    ).tag(config=True)

    max_mounts = Int(
        5000,
        help="""Most read-only file mounts for one server (one per stored file and location).
        Beyond it the rest are not mounted and those files are read through the served path
        (a warning is logged).""",
    ).tag(config=True)

    forbidden_env = List(
        Unicode(),
        FORBIDDEN_ENV,
        help="""Environment variables never passed to a user server (fnmatch patterns), whatever
        ``env_keep`` or ``environment`` say. Any variable whose value contains the Hub's secret
        is removed too. Users run arbitrary code in their servers: these are for the Hub and the
        service only.""",
    ).tag(config=True)

    datastore = Instance(DatastoreAPI, help="The Hub's client of the datastore service.")

    @default("datastore")
    def _default_datastore(self):
        return DatastoreAPI(parent=self)

    labvault_reconciler = Instance(ServerReconciler, help="Checks this server's permitted experiments.")

    @default("labvault_reconciler")
    def _default_reconciler(self):
        return ServerReconciler(parent=self)

    @default("service_url")
    def _default_service_url(self):
        return self.datastore.url

    # --- the JupyterHub hooks this mixin provides (defaults; a deployment may still override) --
    @default("server_token_scopes")
    def _labvault_server_token_scopes(self):
        return ["users:activity!user", "access:servers!server",
                f"access:services!service={self.service_name}"]

    @default("options_form")
    def _labvault_options_form_default(self):
        return type(self)._labvault_options_form

    @default("options_from_form")
    def _labvault_options_from_form_default(self):
        return _options_from_form

    @default("apply_user_options")
    def _labvault_apply_user_options_default(self):
        return type(self)._labvault_apply_user_options

    # --- per-start state (kept in the spawner state: the reconciler needs it after restarts) ----
    labvault_environment = Unicode("")
    labvault_experiments = List(Unicode())
    labvault_started_at = Unicode("")
    labvault_kernels = List(Unicode())
    _labvault_start = Dict(allow_none=True, default_value=None)

    # ------------------------------------------------------------------------------------------
    # the options form (shows only what the user may start)
    # ------------------------------------------------------------------------------------------
    async def _labvault_options_form(self) -> str:
        try:
            answer = await self.datastore.request("GET", f"/users/{quote(self.user.name, safe='')}/environments")
        except DatastoreUnavailable:
            raise web.HTTPError(503, "The labvault datastore service is not reachable; try again in a minute.") from None
        except DatastoreRefused as e:
            raise web.HTTPError(403, f"labvault: {e.reason}") from None
        return render_options_form(answer, self.default_environment)

    # ------------------------------------------------------------------------------------------
    # re-validation (apply_user_options, JupyterHub >= 5.3; also from start() as a fallback)
    # ------------------------------------------------------------------------------------------
    async def _labvault_apply_user_options(self, user_options) -> None:
        if not isinstance(user_options, dict):
            raise web.HTTPError(400, "labvault: user options must be a JSON object like {\"environment\": \"NAME\"}")
        unknown = sorted(set(user_options) - {"environment"})
        if unknown:
            raise web.HTTPError(400, f"labvault: unknown option(s) {', '.join(map(repr, unknown))}: "
                                     "only 'environment' may be chosen")
        choice = user_options.get("environment")
        if choice in (None, ""):
            choice = await self._labvault_default_choice()
        if not isinstance(choice, str) or not ENV_NAME_RE.match(choice):
            raise web.HTTPError(400, "labvault: 'environment' must be the name of an environment")
        path = (f"/users/{quote(self.user.name, safe='')}/environments/{quote(choice, safe='')}/start")
        try:
            answer = await self.datastore.request("POST", path, {"server": self.name or ""})
        except DatastoreUnavailable:
            raise web.HTTPError(503, "labvault: the datastore service is not reachable; try again in a minute") from None
        except DatastoreRefused as e:
            if e.status == 404:
                raise web.HTTPError(400, f"labvault: there is no environment {choice!r} you may use; "
                                         "choose one of those the form offers") from None
            if e.status in (401, 400):
                self.log.error("labvault: the datastore service refused the Hub: %s", e)
                raise web.HTTPError(500, "labvault: the Hub is not configured to talk to the datastore service") from None
            raise web.HTTPError(403, f"labvault: you may not start {choice!r}: {e.reason} ({e.rule})") from None
        self.labvault_apply_start(answer)

    async def _labvault_default_choice(self) -> str:
        try:
            answer = await self.datastore.request("GET", f"/users/{quote(self.user.name, safe='')}/environments")
        except DatastoreUnavailable:
            raise web.HTTPError(503, "labvault: the datastore service is not reachable; try again in a minute") from None
        names = [e["name"] for e in answer.get("environments", [])]
        if self.default_environment and self.default_environment in names:
            return self.default_environment
        if names:
            return names[0]
        why = "; ".join(f"{u['display_name']}: {u['reason']}" for u in answer.get("unavailable", []))
        raise web.HTTPError(403, "labvault: there is no environment you may start" + (f" ({why})" if why else ""))

    def labvault_apply_start(self, answer: dict) -> None:
        """Take the service's answer to a start (environment, experiments, files): remember it
        for the state and the reconciler, and let the spawner class configure itself
        (:meth:`labvault_configure`)."""
        env = answer["environment"]
        self._labvault_start = answer
        self.labvault_environment = env["name"]
        self.labvault_experiments = [e["exid"] for e in answer.get("experiments", [])]
        self.labvault_started_at = str(answer.get("time", ""))
        self.labvault_kernels = [env["kernelspec"]] if env.get("kernelspec") else []
        self.labvault_configure(env)

    def labvault_configure(self, environment: dict) -> None:
        """Apply the chosen environment to this spawner (image, kernels). Overridden by the
        Docker and Kubernetes compositions; the local one runs the Hub's Python environment."""

    def labvault_mounts(self) -> list[ReadOnlyMount]:
        """The read-only mounts of exactly the experiments the user may read (from the start)."""
        answer = self._labvault_start or {}
        root = answer.get("direct_read_root")
        if not (self.mount_experiments and root):
            return []
        mounts: list[ReadOnlyMount] = []
        for exp in answer.get("experiments", []):
            for f in exp.get("files", []):
                obj = f["object"]
                if obj.startswith("/") or ".." in PurePosixPath(obj).parts:
                    continue  # never from the service, but a mount target must stay under root
                for loc in f.get("locations", []):
                    if "/" in loc or loc in ("", ".", ".."):
                        continue
                    mounts.append(ReadOnlyMount(exp["exid"], loc, obj, str(PurePosixPath(root, loc, obj))))
        if len(mounts) > self.max_mounts:
            self.log.warning("labvault: %s may read %d stored objects; mounting the first %d "
                             "(the rest are read through the served path)", self._log_name,
                             len(mounts), self.max_mounts)
            mounts = mounts[: self.max_mounts]
        return mounts

    async def labvault_ensure_applied(self) -> None:
        """start() calls this: if a deployment replaced ``apply_user_options``, validate anyway."""
        if self._labvault_start is None:
            await self._labvault_apply_user_options(self.user_options or {})

    # ------------------------------------------------------------------------------------------
    # the server's environment
    # ------------------------------------------------------------------------------------------
    def get_env(self) -> dict:
        env = super().get_env()
        env["LABVAULT_SERVICE_URL"] = self.service_url
        env["LABVAULT_SERVICE_NAME"] = self.service_name
        if self.labvault_environment:
            env["LABVAULT_ENVIRONMENT"] = self.labvault_environment
            env["LABVAULT_ALLOWED_KERNELS"] = ",".join(self.labvault_kernels)
        root = (self._labvault_start or {}).get("direct_read_root")
        if root and self.labvault_mounts():
            env["LABVAULT_DIRECT_READ_ROOT"] = root
        return self._labvault_scrub_env(env)

    def _labvault_scrub_env(self, env: dict) -> dict:
        secret = self.datastore.secret
        for key in list(env):
            value = env[key]
            if any(fnmatch.fnmatchcase(key, pat) for pat in self.forbidden_env):
                del env[key]
                self.log.warning("labvault: %s is never passed to user servers (removed)", key)
            elif secret and isinstance(value, str) and secret in value:
                del env[key]
                self.log.warning("labvault: %s contained the Hub's secret (removed)", key)
        return env

    # ------------------------------------------------------------------------------------------
    # state and the reconciler
    # ------------------------------------------------------------------------------------------
    def get_state(self) -> dict:
        state = super().get_state()
        if self.labvault_environment:
            state["labvault"] = {"environment": self.labvault_environment,
                                 "experiments": list(self.labvault_experiments),
                                 "started_at": self.labvault_started_at,
                                 "kernels": list(self.labvault_kernels)}
        return state

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        lv = state.get("labvault") or {}
        if lv:
            self.labvault_environment = lv.get("environment", "")
            self.labvault_experiments = list(lv.get("experiments", []))
            self.labvault_started_at = lv.get("started_at", "")
            self.labvault_kernels = list(lv.get("kernels", []))

    def clear_state(self) -> None:
        super().clear_state()
        self.labvault_environment = ""
        self.labvault_experiments = []
        self.labvault_started_at = ""
        self.labvault_kernels = []
        self._labvault_start = None

    async def poll_and_notify(self):
        """JupyterHub's periodic poll of a running server: reconcile first (it may stop the
        server), then poll as usual, which tells the Hub when the server is gone."""
        try:
            await self.labvault_reconciler.reconcile(self)
        except Exception:  # never let a check break the Hub's poll loop
            self.log.exception("labvault: reconciling %s failed", self._log_name)
        return await super().poll_and_notify()


def _options_from_form(form_data: dict) -> dict:
    """The form's one field, as ``{"environment": NAME}``. No side effects (JupyterHub's rule):
    validation happens in apply_user_options, the same for form and REST API spawns."""
    values = form_data.get("environment") or []
    value = values[0] if isinstance(values, list) and values else values
    return {"environment": value} if isinstance(value, str) and value else {}


def render_options_form(answer: dict, default_environment: str = "") -> str:
    """The spawn form's HTML for the service's answer of ``GET /hub/users/{name}/environments``
    (Bootstrap 5 markup, as JupyterHub's own pages; every value escaped)."""
    esc = html.escape
    envs = answer.get("environments", [])
    names = [e["name"] for e in envs]
    chosen = default_environment if default_environment in names else (names[0] if names else "")
    out = ['<div class="labvault-environments">']
    last = answer.get("last_stop")
    if last:
        out.append(f'<div class="alert alert-warning" role="alert">Your last server was stopped on '
                   f'{esc(str(last.get("time", ""))[:16].replace("T", " "))} UTC because your access changed '
                   f'({esc(last.get("rule", ""))}); the notice was sent to your e-mail address.</div>')
    if envs:
        out.append("<p>Choose the software environment of your server. Only environments your "
                   "institution is licensed for are offered.</p>")
    else:
        out.append('<div class="alert alert-danger" role="alert">There is no environment you may '
                   "start at the moment.</div>")
    for e in envs:
        ident = "lv-env-" + esc(e["name"])
        notes = []
        if e.get("licences"):
            notes.append("licensed: " + ", ".join(esc(x) for x in e["licences"]))
        if e.get("proprietary"):
            notes.append("your institution's own environment")
        note = f' <small class="text-muted">({"; ".join(notes)})</small>' if notes else ""
        checked = " checked" if e["name"] == chosen else ""
        out.append(
            f'<div class="form-check">'
            f'<input class="form-check-input" type="radio" name="environment" id="{ident}" '
            f'value="{esc(e["name"])}"{checked}>'
            f'<label class="form-check-label" for="{ident}"><strong>{esc(e.get("display_name") or e["name"])}'
            f"</strong>{note}</label></div>"
        )
    unavailable = answer.get("unavailable", [])
    if unavailable:
        out.append('<p class="mt-3 mb-1"><small>Not available to you:</small></p><ul class="small text-muted">')
        out += [f"<li>{esc(u.get('display_name') or u['name'])}: {esc(u.get('reason', ''))}</li>" for u in unavailable]
        out.append("</ul>")
    out.append("</div>")
    return "\n".join(out)


class LabvaultLocalSpawner(LicensedEnvironmentMixin, LocalProcessSpawner):
    """Local processes (the embedded default): the environment's kernelspec is what the server
    offers (``$LABVAULT_ALLOWED_KERNELS``); nothing is mounted (reads are served).

    As root each user's server runs as that user's system account (LocalProcessSpawner's
    default): a kernel cannot read the key, the database or other users' files. Without root
    (or with :attr:`run_as_hub_user`) every server runs as the Hub's own OS user — a
    development setup, without isolation between users, and the log says so.
    """

    run_as_hub_user = Bool(
        help="""Run every user's server as the Hub's own OS user, in a per-user directory under
        :attr:`home_root`, instead of as the user's system account. NO ISOLATION: a kernel can
        read whatever the Hub's OS user can. Default: True when the Hub is not root (it could
        not switch users anyway), False as root.""",
    ).tag(config=True)

    @default("run_as_hub_user")
    def _default_run_as_hub_user(self):
        return os.getuid() != 0

    home_root = Unicode(
        help="""With :attr:`run_as_hub_user`: the directory holding one working directory per
        user (``<home_root>/<username>``, mode 0700). Default: ``labvault-homes`` in the Hub's
        working directory.""",
    ).tag(config=True)

    @default("home_root")
    def _default_home_root(self):
        return os.path.join(os.getcwd(), "labvault-homes")

    home_mode = Int(
        0o700,
        help="""With one system account per user (not :attr:`run_as_hub_user`): the most a
        user's home directory may allow, applied (as root) before their server starts. A home
        that others can read lets every other user's kernel read its notebooks and outputs
        (``useradd -m`` makes 0755 homes). Default 0o700; 0 leaves homes alone.""",
    ).tag(config=True)

    umask = Int(
        0o077,
        help="""umask of every user's server and its kernels: files they create (notebooks,
        outputs, downloads of experiment data) are their owner's alone. Default 0o077.""",
    ).tag(config=True)

    kernel_data_dirs = List(
        Unicode(),
        help="""Jupyter data directories put first on the server's ``JUPYTER_PATH``: where
        ``labvault environment sync --kernels-dir DIR`` installed the catalogue's kernelspecs.""",
    ).tag(config=True)

    _warned_shared_user = False

    @property
    def labvault_home(self) -> str:
        return str(Path(self.home_root) / self.user.name)

    def make_preexec_fn(self, name):
        umask = self.umask
        if not self.run_as_hub_user:
            switch_user = super().make_preexec_fn(name)

            def preexec():  # in the child, before exec: the user's account, private files
                switch_user()
                os.umask(umask)

            return preexec
        home = self.labvault_home

        def preexec():  # in the child, before exec
            os.makedirs(home, 0o700, exist_ok=True)
            os.chdir(home)
            os.umask(umask)

        return preexec

    def _private_home(self) -> None:
        """Take group/other access the home should not allow away (see :attr:`home_mode`)."""
        import pwd
        import stat

        try:
            home = pwd.getpwnam(self.user.name).pw_dir
            mode = stat.S_IMODE(os.stat(home).st_mode)
        except (KeyError, OSError):
            return  # no such account or home: LocalProcessSpawner says so when it starts
        if mode & ~self.home_mode & 0o777:
            os.chmod(home, mode & self.home_mode)
            self.log.warning("labvault: %s's home %s was mode %o, others could read it; now %o "
                             "(LabvaultLocalSpawner.home_mode)", self.user.name, home, mode, mode & self.home_mode)

    def user_env(self, env: dict) -> dict:
        if not self.run_as_hub_user:
            return super().user_env(env)
        env["USER"] = self.user.name
        env["HOME"] = self.labvault_home
        env["SHELL"] = "/bin/bash"
        return env

    def get_env(self) -> dict:
        env = super().get_env()
        if self.kernel_data_dirs:
            env["JUPYTER_PATH"] = os.pathsep.join(
                [*self.kernel_data_dirs, *([env["JUPYTER_PATH"]] if env.get("JUPYTER_PATH") else [])])
        return env

    def get_args(self) -> list[str]:
        args = super().get_args()
        if self.run_as_hub_user and os.getuid() == 0 and "--allow-root" not in args:
            args.append("--allow-root")  # the server runs as root here; without it, a spawn timeout
        return args

    async def start(self):
        await self.labvault_ensure_applied()
        if self.run_as_hub_user and not LabvaultLocalSpawner._warned_shared_user:
            LabvaultLocalSpawner._warned_shared_user = True
            self.log.warning(
                "labvault: user servers run as the Hub's OS user (uid %d), WITHOUT ISOLATION between "
                "users: a kernel can read whatever that user can. %s", os.getuid(),
                "Set LabvaultLocalSpawner.run_as_hub_user = False for one system account per user."
                if os.getuid() == 0 else "Run the Hub as root for one system account per user.")
        if self.run_as_hub_user:
            Path(self.home_root).mkdir(mode=0o700, parents=True, exist_ok=True)
        elif self.home_mode and os.getuid() == 0:
            self._private_home()
        return await super().start()


__all__ = ["LicensedEnvironmentMixin", "LabvaultLocalSpawner", "ReadOnlyMount", "render_options_form"]
