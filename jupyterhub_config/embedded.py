"""The embedded default deployment: one machine, SQLite, local accounts, local processes.

``jupyterhub_config/jupyterhub_config.py`` (what ``make run`` starts) is two lines that call
:func:`configure`. Like The Littlest JupyterHub, the configuration logic is a pure function
applied to a ``Config`` object, so it is tested without starting anything.

What it sets up, all under the data directory (mode 0700):

- the secrets it needs, generated once and kept in files (0600): the Hub's cookie secret, the
  ``JUPYTERHUB_CRYPT_KEY`` that encrypts ``auth_state`` (institution, vendor flag), and the secret
  shared by the Hub and the datastore service (``LABVAULT_HUB_SECRET``);
- the datastore service as a Hub-managed service (``labvault service``; its database URL stays
  in the data directory, never on a command line, which the Hub logs);
- a local mailbox (``labvault mailbox``: aiosmtpd on loopback) as a second managed service: it
  keeps every message under ``<data>/mail/`` and prints confirmation links to the console;
- the labvault authenticator (local accounts) and the licensed-environment local spawner;
- node's configurable-http-proxy (``make run`` installs it with npm);
- JupyterHub's access log without full client IPs.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
from pathlib import Path

SERVICE_NAME = "labvault"

#: Written once to <data>/labvault_config.py (the service's and the CLI's config); edit it freely.
DEFAULT_SERVICE_CONFIG = """\
# labvault configuration of the embedded default (written by the first `make run`; yours to edit).
# Every option: docs/config-reference.md.
c = get_config()  # noqa

# mail goes to the local mailbox (labvault mailbox, a Hub-managed service): see <data>/mail/
c.Mailer.smtp_port = {smtp_port}

# The demo world's PI (alice) would have to set up a TOTP app at her first sign-in. For the
# local demo that is off; delete this line to require two-factor sign-in for PIs (the default).
c.Policy.totp_required_for_pis = False
"""


def secret_file(path: Path, nbytes: int = 32) -> str:
    """The hex secret in ``path``, created (0600, atomically) on first use."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(nbytes) + "\n")
        os.replace(tmp, path)
    return path.read_text().strip()


def find_proxy(repo: Path | None = None) -> str | None:
    """node's configurable-http-proxy: ./node_modules (``make``), else on PATH."""
    for base in [repo, Path.cwd()] if repo else [Path.cwd()]:
        candidate = Path(base, "node_modules", ".bin", "configurable-http-proxy")
        if candidate.exists():
            return str(candidate)
    return shutil.which("configurable-http-proxy")


def configure(c, data_dir: str | os.PathLike, *, ip: str = "127.0.0.1", port: int = 8000,
              hub_port: int = 8081, proxy_api_port: int = 8001, service_port: int = 8890,
              smtp_port: int = 8025, repo: str | os.PathLike | None = None,
              python: str | None = None) -> None:
    """Apply the embedded default to JupyterHub's config object ``c``."""
    data = Path(data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    os.chmod(data, 0o700)
    hub_dir = data / "hub"
    hub_dir.mkdir(exist_ok=True)
    python = python or sys.executable

    service_config = data / "labvault_config.py"
    if not service_config.exists():
        service_config.write_text(DEFAULT_SERVICE_CONFIG.format(smtp_port=smtp_port))
    hub_secret = secret_file(data / "hub_secret")
    # auth_state (institution, vendor flag) is encrypted with this key; JupyterHub reads the env
    os.environ.setdefault("JUPYTERHUB_CRYPT_KEY", secret_file(data / "crypt_key"))
    service_url = f"http://127.0.0.1:{service_port}"
    # the Hub's own side of the Hub-internal API (authenticator, spawner, reconciler)
    os.environ["LABVAULT_HUB_SECRET"] = hub_secret
    os.environ["LABVAULT_SERVICE_URL"] = f"{service_url}/services/{SERVICE_NAME}"

    c.JupyterHub.ip = ip
    c.JupyterHub.port = port
    c.JupyterHub.hub_ip = "127.0.0.1"
    c.JupyterHub.hub_port = hub_port
    c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{proxy_api_port}"
    c.JupyterHub.db_url = f"sqlite:///{hub_dir / 'jupyterhub.sqlite'}"
    c.JupyterHub.cookie_secret_file = str(hub_dir / "jupyterhub_cookie_secret")
    c.JupyterHub.pid_file = str(hub_dir / "jupyterhub.pid")
    c.ConfigurableHTTPProxy.pid_file = str(hub_dir / "proxy.pid")
    proxy = find_proxy(Path(repo) if repo else None)
    if proxy:
        c.ConfigurableHTTPProxy.command = [proxy]

    c.JupyterHub.authenticator_class = "labvault"
    c.JupyterHub.spawner_class = "labvault-local"
    # One machine, one OS user: every server runs as the Hub's user in its own directory. NO
    # isolation between users' kernels (docs/operators.md says how production isolates them).
    c.LabvaultLocalSpawner.run_as_hub_user = True
    c.LabvaultLocalSpawner.home_root = str(data / "homes")
    c.Spawner.default_url = "/lab"
    c.Spawner.start_timeout = 60
    c.Authenticator.enable_auth_state = True
    c.Authenticator.admin_users = {"admin"}
    c.JupyterHub.log_datefmt = "%Y-%m-%d %H:%M:%S"

    common = ["--data-dir", str(data)]
    c.JupyterHub.services = [
        {
            "name": SERVICE_NAME,
            "url": service_url,
            "command": [python, "-m", "labvault.datastore.cli", "service", *common,
                        f"--Mailer.smtp_port={smtp_port}"],
            "environment": {"LABVAULT_HUB_SECRET": hub_secret},
            "display": False,
            "oauth_no_confirm": True,
        },
        {
            "name": "labvault-mailbox",
            "command": [python, "-m", "labvault.datastore.cli", "mailbox", *common, f"--port={smtp_port}"],
            "display": False,
        },
    ]
    c.JupyterHub.load_roles = [
        # users reach the datastore service with their own tokens (kernels, widgets, extension)
        {"name": "user", "scopes": ["self", f"access:services!service={SERVICE_NAME}"]},
        {"name": "server", "scopes": ["users:activity!user", "access:servers!user",
                                      f"access:services!service={SERVICE_NAME}"]},
    ]
    # JupyterHub's request log, with truncated client IPs (privacy statement)
    from .logs import log_request

    c.JupyterHub.tornado_settings.update({"log_function": log_request})
