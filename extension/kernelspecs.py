"""Only licensed kernels: a kernel spec manager that lists and starts the kernels the spawner
allowed for this server, and no others.

The spawner decides which environments a user may use (licences, institution) and passes the
allowed kernel names in ``$LABVAULT_ALLOWED_KERNELS`` (comma-separated). Without the variable,
only the server's own Python kernel (``python3``) is offered: deny by default, yet a server
started without labvault's spawner still works. Set but empty: no kernel at all.

This is the file browser's and launcher's view; the licence boundary itself is the image the
spawner starts (a user's code could run any program the image holds).
"""

from __future__ import annotations

import os

from jupyter_client.kernelspec import KernelSpec, KernelSpecManager, NoSuchKernel
from tornado import web
from traitlets import Set, Unicode, default

ENV = "LABVAULT_ALLOWED_KERNELS"
DEFAULT_KERNEL = "python3"


class KernelNotLicensed(NoSuchKernel, web.HTTPError):
    """A kernel that exists but is not allowed here: jupyter_client sees ``NoSuchKernel``
    (the sessions API answers its own clear error), the kernels API a 403 with the reason."""

    def __init__(self, name: str):
        web.HTTPError.__init__(self, 403, f"the kernel {name!r} is not licensed for this server "
                                          "(it is not among the environments the spawner allowed you)",
                               reason="environment.licensed")
        self.args = ()
        self.kernel_name = name


def allowed_from_env(value: str | None) -> set[str]:
    """``$LABVAULT_ALLOWED_KERNELS`` as a set of lower-case kernel names (None: the default)."""
    if value is None:
        return {DEFAULT_KERNEL}
    return {name.strip().lower() for name in value.split(",") if name.strip()}


class LicensedKernelSpecManager(KernelSpecManager):
    """Lists and starts only the kernels in :attr:`allowed_kernels`."""

    allowed_kernels = Set(
        Unicode(),
        help="""Kernel names (kernelspec names) this server may list and start.

        Default: ``$LABVAULT_ALLOWED_KERNELS`` (comma-separated), which the labvault spawner sets
        from the environments the user is licensed for. Without the variable only ``python3`` is
        allowed; an empty value allows none. Unlike ``KernelSpecManager.allowed_kernelspecs``,
        an empty set here means *nothing*, and a kernel that is not allowed cannot be started
        by name either.
        """,
    ).tag(config=True)

    @default("allowed_kernels")
    def _default_allowed(self) -> set[str]:
        return allowed_from_env(os.environ.get(ENV))

    def _allowed(self, name: str) -> bool:
        return name.lower() in {k.lower() for k in self.allowed_kernels}

    def find_kernel_specs(self) -> dict[str, str]:
        return {name: d for name, d in super().find_kernel_specs().items() if self._allowed(name)}

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        if not self._allowed(kernel_name):
            self.log.info("kernel %r refused: not licensed for this server", kernel_name)
            raise KernelNotLicensed(kernel_name)
        return super().get_kernel_spec(kernel_name)

    def default_kernel(self) -> str | None:
        """The kernel new notebooks get: ``python3`` when allowed, else the first allowed one."""
        names = sorted(self.find_kernel_specs())
        if DEFAULT_KERNEL in names:
            return DEFAULT_KERNEL
        return names[0] if names else None
