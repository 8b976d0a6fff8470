"""Hub-internal API for the spawner and the reconciler: environments a user may start, experiments a user may mount."""

from __future__ import annotations

ROUTES: list[tuple[str, type]] = []
