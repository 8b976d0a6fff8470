"""labvault: a research data platform built on JupyterHub.

The sub-packages follow the design's folder map: ``labvault.policies`` (pure decisions),
``labvault.datastore`` (database, store, audit, service), ``labvault.hub``,
``labvault.extension``, ``labvault.kernels`` and ``labvault.widgets``.
"""

__version__ = "0.1.0"
