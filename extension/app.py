"""The labvault jupyter-server extension: HDF5 endpoints, and the checks that the contents and
kernel spec managers the shipped config selects are in place.

Enabled by ``etc/jupyter/jupyter_server_config.d/labvault.json`` (installed with labvault).
Those ``.d`` files can only enable extensions (jupyter_server reads nothing else from them), so
the extension itself selects :class:`~labvault.extension.contents.LabvaultContentsManager` and
:class:`~labvault.extension.kernelspecs.LicensedKernelSpecManager` when it is linked — before
the server creates its managers — unless the deployment configured other ones explicitly.
"""

from __future__ import annotations

from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool, Integer

from .contents import LabvaultContentsManager
from .handlers import ENDPOINTS
from .kernelspecs import LicensedKernelSpecManager


def log_request_masked(handler) -> None:
    """jupyter_server's request log line, with the client address truncated (privacy statement:
    access logs keep no full IP addresses; 192.168.x.x, IPv6 /48)."""
    from jupyter_server.log import log_request

    from labvault.policies import truncate_ip

    handler.request.remote_ip = truncate_ip(handler.request.remote_ip)  # the request is finished
    log_request(handler, record_prometheus_metrics=handler.settings.get("record_prometheus_metrics", True))


class LabvaultExtension(ExtensionApp):
    """labvault in the single-user server."""

    name = "labvault"
    description = "labvault: /experiments decided per request, licensed kernels, HDF5 preview"
    load_other_extensions = True

    h5web_routes = Bool(
        True,
        help="""Also answer the HDF5 endpoints under ``<base_url>/h5web/`` — the URL the
        jupyterlab-h5web viewer asks — so it can show files under /experiments. With
        jupyterlab-h5web installed, disable its own server extension
        (``jupyter server extension disable jupyterlab_h5web``): it reads only local files and,
        loading first, would answer those URLs itself. The labvault endpoints serve home files
        too. The endpoints are always available under ``<base_url>/labvault/h5grove/``.""",
    ).tag(config=True)

    max_slice_bytes = Integer(
        256 * 1024 * 1024,
        help="""Largest dataset selection (bytes, before encoding) one HDF5 data or stats request
        may read; larger selections answer 413 and the viewer asks for smaller slices.""",
    ).tag(config=True)

    select_managers = Bool(
        True,
        help="""Make the server use LabvaultContentsManager and LicensedKernelSpecManager, unless
        ``ServerApp.contents_manager_class`` / ``ServerApp.kernel_spec_manager_class`` are set
        explicitly (then those win, and a warning says what labvault cannot do without them).""",
    ).tag(config=True)

    def _link_jupyter_server_extension(self, serverapp) -> None:
        super()._link_jupyter_server_extension(serverapp)
        if not self.select_managers:
            return
        configured = serverapp.config.ServerApp
        # the managers are created after every extension is linked (ServerApp.init_configurables)
        if "contents_manager_class" not in configured:
            serverapp.contents_manager_class = LabvaultContentsManager
        if "kernel_spec_manager_class" not in configured:
            serverapp.kernel_spec_manager_class = LicensedKernelSpecManager

    def initialize_handlers(self) -> None:
        prefixes = ["labvault/h5grove"] + (["h5web"] if self.h5web_routes else [])
        for prefix in prefixes:
            for endpoint, handler in ENDPOINTS.items():
                self.handlers.append((rf"/{prefix}/{endpoint}/?", handler))

    def initialize_settings(self) -> None:
        serverapp = self.serverapp
        # the server's access log, with client addresses truncated like the Hub's and the service's
        self.settings["log_function"] = log_request_masked  # merged into the web app after this
        cm = serverapp.contents_manager
        if not isinstance(cm, LabvaultContentsManager):
            self.log.warning("labvault: the contents manager is %s, not LabvaultContentsManager: "
                             "/experiments is not shown (set ServerApp.contents_manager_class)",
                             type(cm).__name__)
        ksm = serverapp.kernel_spec_manager
        if isinstance(ksm, LicensedKernelSpecManager):
            kernel = ksm.default_kernel()
            km = serverapp.kernel_manager
            if kernel and km.default_kernel_name != kernel:
                km.default_kernel_name = kernel
            self.log.info("labvault: kernels allowed here: %s", ", ".join(sorted(ksm.allowed_kernels)) or "none")
        else:
            self.log.warning("labvault: the kernel spec manager is %s, not LicensedKernelSpecManager: "
                             "every installed kernel is offered", type(ksm).__name__)

    async def stop_extension(self) -> None:
        cm = self.serverapp.contents_manager if self.serverapp else None
        if isinstance(cm, LabvaultContentsManager):
            cm.connection.close()
