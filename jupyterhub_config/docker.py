"""labvault's spawner for Docker (``labvault-docker``): the chosen environment's image, and
read-only bind mounts of exactly the stored objects of the experiments the user may read.

Importing this module imports dockerspawner (``pip install labvault[docker]``); nothing else
in labvault does.
"""

from __future__ import annotations

from dockerspawner import DockerSpawner
from tornado import web
from traitlets import Dict, Unicode

from .spawner import LicensedEnvironmentMixin


class LabvaultDockerSpawner(LicensedEnvironmentMixin, DockerSpawner):
    """DockerSpawner with labvault's licensed environments.

    The image is the environment's (``image`` in its manifest); ``image`` in user options is
    refused like any other option but ``environment``. With the service's
    ``direct_read_root`` set, each stored object of each permitted experiment is bind-mounted
    read-only at ``<direct_read_root>/<location>/<object>``, from :attr:`store_locations` on
    the Docker host. Nothing else of the store is visible in the container.
    """

    store_locations = Dict(
        key_trait=Unicode(),
        value_trait=Unicode(),
        help="""Storage location name -> its directory on the Docker host, e.g.
        ``{"replica-1": "/srv/disk1/labvault", "replica-2": "/srv/disk2/labvault"}``.
        Default: the directories the datastore service reports (right when the service runs on
        the Docker host itself). A location missing here and there is not mounted.""",
    ).tag(config=True)

    def labvault_configure(self, environment: dict) -> None:
        image = environment.get("image")
        if not image:
            raise web.HTTPError(400, f"labvault: the environment {environment['name']!r} has no container "
                                     "image, so it cannot run on this Docker deployment")
        self.image = image

    def labvault_binds(self) -> dict:
        """The read-only binds of the permitted experiments, in docker-py's form:
        ``{host_path: {"bind": container_path, "mode": "ro"}}``."""
        reported = (self._labvault_start or {}).get("locations") or {}
        binds = {}
        for m in self.labvault_mounts():
            host_dir = self.store_locations.get(m.location) or reported.get(m.location)
            if not host_dir:
                continue
            binds[f"{host_dir.rstrip('/')}/{m.object}"] = {"bind": m.target, "mode": "ro"}
        return binds

    @property
    def volume_binds(self) -> dict:
        binds = super().volume_binds
        binds.update(self.labvault_binds())
        return binds

    async def start(self):
        await self.labvault_ensure_applied()
        return await super().start()


__all__ = ["LabvaultDockerSpawner"]
