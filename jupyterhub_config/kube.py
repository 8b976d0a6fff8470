"""labvault's spawner for Kubernetes (``labvault-kube``, Zero to JupyterHub): the chosen
environment's image, and read-only ``subPath`` mounts of exactly the stored objects of the
experiments the user may read.

Importing this module imports kubespawner and kubernetes_asyncio
(``pip install labvault[kubernetes]``); nothing else in labvault does.
"""

from __future__ import annotations

import re

from kubernetes_asyncio.client.models import V1Volume, V1VolumeMount
from kubespawner import KubeSpawner
from kubespawner.utils import get_k8s_model
from tornado import web
from traitlets import Dict, Unicode

from .spawner import LicensedEnvironmentMixin


def _volume_name(location: str) -> str:
    """A DNS-1123 label for a storage location's volume (``labvault-store-replica-1``)."""
    slug = re.sub(r"[^a-z0-9-]+", "-", location.lower()).strip("-")[:40] or "x"
    return f"labvault-store-{slug}"


class LabvaultKubeSpawner(LicensedEnvironmentMixin, KubeSpawner):
    """KubeSpawner with labvault's licensed environments.

    The pod's image is the environment's. With the service's ``direct_read_root`` set, each
    storage location named in :attr:`store_volumes` becomes one pod volume, and each stored
    object of each permitted experiment one read-only ``volumeMount`` with ``subPath`` (the
    object's key) at ``<direct_read_root>/<location>/<object>``. The rest of the volume is not
    visible in the pod. Don't combine with ``profile_list``: the environments replace profiles,
    and a ``profile`` user option is refused.
    """

    store_volumes = Dict(
        key_trait=Unicode(),
        value_trait=Dict(),
        help="""Storage location name -> the Kubernetes volume source holding it, e.g.
        ``{"replica-1": {"persistentVolumeClaim": {"claimName": "labvault-replica-1",
        "readOnly": True}}}``. Locations not named here are not mounted (their files are read
        through the served path).""",
    ).tag(config=True)

    def labvault_configure(self, environment: dict) -> None:
        image = environment.get("image")
        if not image:
            raise web.HTTPError(400, f"labvault: the environment {environment['name']!r} has no container "
                                     "image, so it cannot run on this Kubernetes deployment")
        self.image = image

    def labvault_volumes(self) -> tuple[list[dict], list[dict]]:
        """(pod volumes, notebook container volumeMounts) of the permitted experiments, in the
        Kubernetes API's JSON form."""
        mounts = [m for m in self.labvault_mounts() if m.location in self.store_volumes]
        volumes = []
        for location in sorted({m.location for m in mounts}):
            source = {k: v for k, v in self.store_volumes[location].items() if k != "name"}
            if "persistentVolumeClaim" in source:  # the claim read-only too, not only the mounts
                source["persistentVolumeClaim"] = {**source["persistentVolumeClaim"], "readOnly": True}
            volumes.append({"name": _volume_name(location), **source})
        volume_mounts = [{"name": _volume_name(m.location), "mountPath": m.target, "subPath": m.object,
                          "readOnly": True} for m in mounts]
        return volumes, volume_mounts

    async def get_pod_manifest(self):
        pod = await super().get_pod_manifest()
        volumes, volume_mounts = self.labvault_volumes()
        if volumes:
            pod.spec.volumes = [*(pod.spec.volumes or []), *(get_k8s_model(V1Volume, v) for v in volumes)]
            notebook = pod.spec.containers[0]
            notebook.volume_mounts = [*(notebook.volume_mounts or []),
                                      *(get_k8s_model(V1VolumeMount, m) for m in volume_mounts)]
        return pod

    async def start(self):
        await self.labvault_ensure_applied()
        return await super().start()


__all__ = ["LabvaultKubeSpawner"]
