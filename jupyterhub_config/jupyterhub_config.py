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
    configure(
        c,
        os.environ.get("LABVAULT_DATA_DIR", "var"),
        port=int(os.environ.get("LABVAULT_PORT", "8000")),
        repo=Path(__file__).resolve().parent.parent,
    )
