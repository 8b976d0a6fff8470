"""labvault in the single-user server: ``/experiments`` decided per request by the datastore
service, only licensed kernels, HDF5 structure and slices for the file browser.

Enabled by the shipped ``jupyter_server_config.d/labvault.json``; see docs/extension.md.
"""

from __future__ import annotations


def _jupyter_server_extension_points() -> list[dict]:
    from .app import LabvaultExtension

    return [{"module": "labvault.extension", "app": LabvaultExtension}]
