"""The embedded default deployment, as started by ``make run``:

    LABVAULT_DATA_DIR=var jupyterhub -f jupyterhub_config/jupyterhub_config.py

Everything is in :func:`labvault.hub.embedded.configure`; production deployments write their
own config (docs/operators.md). Settings below the call override the default.
"""

import os
from pathlib import Path

if "get_config" in globals():  # run by JupyterHub's config loader (not when imported)
    from labvault.hub.embedded import configure

    c = get_config()  # noqa: F821 - provided by JupyterHub's config loader
    ports = {  # LABVAULT_PORT=8000 is where people sign in; the others are internal (loopback)
        name: int(os.environ[var])
        for name, var in (("port", "LABVAULT_PORT"), ("hub_port", "LABVAULT_HUB_PORT"),
                          ("proxy_api_port", "LABVAULT_PROXY_API_PORT"),
                          ("service_port", "LABVAULT_SERVICE_PORT"), ("smtp_port", "LABVAULT_SMTP_PORT"))
        if os.environ.get(var)
    }
    configure(c, os.environ.get("LABVAULT_DATA_DIR", "var"), repo=Path(__file__).resolve().parent.parent,
              **ports)
