"""``ExperimentBrowser()``: my experiments, their files, the HDF5 tree, and a frame preview.

Everything loads lazily: the experiment list first; a file's list when its experiment is
chosen; one HDF5 group's members when it is opened; one frame when it is shown. Frames larger
than ``progress_bytes`` are read in row blocks with a progress bar. The preview has contrast
controls (percentiles, colour map, log scale), a histogram and a slice picker for the leading
axes. Data comes through the client (``Client.h5``): every read is decided by the service.
"""

from __future__ import annotations

import posixpath

import ipywidgets as W
import numpy as np
from traitlets import Integer

from labvault.datastore.client import Client, LabvaultError

from . import preview
from .common import STYLE, LabvaultWidget, day, esc

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".nxs", ".nx5", ".cxi")
UP = ".."


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class ExperimentBrowser(LabvaultWidget):
    """Browse the experiments I may access, their files and HDF5 contents; preview frames."""

    progress_bytes = Integer(8 * 1024 * 1024, help="""Frames larger than this are read in row
        blocks of about this size, with a progress bar (long reads over the network).""")
    max_members = Integer(500, help="Members of one HDF5 group listed at once.")
    max_line_points = Integer(100_000, help="Points of a 1-D dataset read for its plot.")
    max_pixels = Integer(1024, help="Longest side of a preview image (larger frames are shown subsampled).")

    def __init__(self, *, client: Client | None = None, **kwargs):
        super().__init__(client=client, **kwargs)
        self.h5file = None
        self.file_path: str | None = None
        self.group = "/"
        self.dataset_path: str | None = None
        self.frame: np.ndarray | None = None
        #: row blocks of the last frame read (1 unless it was a long read)
        self.last_read_blocks = 0
        self._navigating = False
        self.experiments = W.Select(options=[], rows=8, description="Experiment",
                                    layout=W.Layout(width="28em"))
        self.files = W.Select(options=[], rows=8, description="File", layout=W.Layout(width="28em"))
        self.tree = W.Select(options=[], rows=10, description="HDF5", layout=W.Layout(width="28em"))
        self.location = W.HTML()
        self.info = W.HTML()
        self.image = W.Image(format="png", layout=W.Layout(max_width="520px"))
        self.histogram = W.Image(format="png", layout=W.Layout(max_width="520px"))
        self.contrast = W.FloatRangeSlider(value=(1.0, 99.5), min=0.0, max=100.0, step=0.5,
                                           description="Contrast %", continuous_update=False,
                                           readout_format=".1f", layout=W.Layout(width="28em"))
        self.cmap = W.Dropdown(options=["viridis", "gray", "magma", "inferno", "cividis"], value="viridis",
                               description="Colours")
        self.log_scale = W.Checkbox(value=False, description="log scale")
        self.slices = W.VBox()
        self.slice_sliders: list[W.IntSlider] = []
        self.progress = W.IntProgress(value=0, min=0, max=1, description="Reading",
                                      layout=W.Layout(visibility="hidden", width="28em"))
        self.refresh_button = W.Button(description="Refresh", icon="refresh")
        self.refresh_button.on_click(lambda _b: self.refresh())
        self.experiments.observe(self._on_experiment, names="value")
        self.files.observe(self._on_file, names="value")
        self.tree.observe(self._on_tree, names="value")
        for w in (self.contrast, self.cmap, self.log_scale):
            w.observe(lambda _c: self.render(), names="value")
        self.controls = W.VBox([self.slices, self.contrast, W.HBox([self.cmap, self.log_scale])])
        left = W.VBox([self.experiments, self.files, self.location, self.tree, W.HBox([self.refresh_button])])
        right = W.VBox([self.info, self.progress, self.controls, self.image, self.histogram])
        self.children = [W.HTML(STYLE), W.HTML("<h3>My experiments</h3>"), W.HBox([left, right]), self.status]
        self.refresh()

    # -- experiments and files --------------------------------------------------------------
    def refresh(self) -> None:
        """Load the list of experiments I may access now (nothing else is read yet)."""
        found = self.call(self.client.experiments)
        items = found or []
        self._navigating = True
        try:
            self.experiments.options = [(f"{e['exid']} · {e['title']}", e["exid"]) for e in items]
            self.experiments.value = None
        finally:
            self._navigating = False
        self._experiment_items = {e["exid"]: e for e in items}
        if found is not None:
            self.status.info(f"{len(items)} experiment(s)")

    def _on_experiment(self, change) -> None:
        if not self._navigating and change["new"]:
            self.open_experiment(change["new"])

    def open_experiment(self, exid: str) -> None:
        self._close_file()
        self.files.options = []
        e = getattr(self, "_experiment_items", {}).get(exid, {})
        self.info.value = (f"<b>{esc(exid)}</b> {esc(e.get('title'))}<br>"
                           f"PI {esc((e.get('pi') or {}).get('display_name'))} · {esc(e.get('facility'))} · "
                           f"ends {esc(day(e.get('end')))}" if e else f"<b>{esc(exid)}</b>")
        found = self.call(self.client.files, exid)
        if found is None:
            return
        live = [f for f in found if not f.get("deleted_at")]
        self._files = {f["path"]: f for f in found}
        self._navigating = True
        try:
            self.files.options = [(f"{f['path']}  ({_size(f['size'])})", f["path"]) for f in live]
            self.files.value = None
        finally:
            self._navigating = False
        gone = len(found) - len(live)
        self.status.info(f"{len(live)} file(s)" + (f"; {gone} deleted" if gone else ""))

    def _on_file(self, change) -> None:
        if not self._navigating and change["new"]:
            self.open_file(change["new"])

    def open_file(self, path: str) -> None:
        """Show a file; an HDF5 file opens (lazily: only its root group is listed)."""
        self._close_file()
        exid = self.experiments.value
        meta = getattr(self, "_files", {}).get(path, {})
        self.info.value = (f"<b>{esc(path)}</b> · {_size(meta.get('size', 0))} · sha256 "
                           f"<code>{esc((meta.get('checksum') or '')[:16])}…</code> · "
                           f"{meta.get('replicas', '?')} replicas")
        if not path.lower().endswith(HDF5_SUFFIXES):
            return
        try:
            self.h5file = self.client.h5(exid, path)
        except LabvaultError as e:
            self.last_error = e
            self.status.refused(e)
            return
        except Exception as e:  # not HDF5 after all, or damaged: say so, no traceback
            self.status.problem(f"{path} could not be opened as HDF5: {e}")
            return
        self.file_path = path
        self._safely(self.open_group, "/")

    def _close_file(self) -> None:
        self._clear_preview()
        self.tree.options = []
        self.location.value = ""
        self.file_path = None
        if self.h5file is not None:
            try:
                self.h5file.close()
            except Exception:  # closing a file whose reads are now refused
                pass
            self.h5file = None

    # -- the HDF5 tree ------------------------------------------------------------------------
    def open_group(self, group: str) -> None:
        """List one group's members (nothing below it is read)."""
        import h5py

        g = self.h5file[group]
        entries = [(f"⬆ {UP}", UP)] if group != "/" else []
        names = list(g.keys())
        for name in names[: self.max_members]:
            kind = g.get(name, getclass=True)
            if kind is h5py.Group:
                entries.append((f"📁 {name}/", name))
            elif kind is h5py.Dataset:
                ds = g[name]
                entries.append((f"▦ {name}  {ds.shape} {ds.dtype}", name))
            else:
                entries.append((f"? {name}", name))
        self.group = group
        self._navigating = True
        try:
            self.tree.options = entries
            self.tree.value = None
        finally:
            self._navigating = False
        more = f" (first {self.max_members} of {len(names)})" if len(names) > self.max_members else ""
        self.location.value = f"<code>{esc(self.file_path)}:{esc(group)}</code>{more}"

    def _on_tree(self, change) -> None:
        if self._navigating or not change["new"]:
            return
        name = change["new"]
        if name == UP:
            self._safely(self.open_group, posixpath.dirname(self.group.rstrip("/")) or "/")
            return
        self._safely(self.open_item, posixpath.join(self.group, name))

    def _safely(self, fn, *args) -> None:
        """Run a step that reads the file; a refusal (access ended) or a damaged file is shown
        in the status line, never as a traceback."""
        try:
            fn(*args)
        except Exception as e:
            self.status.problem(f"{self.file_path}: {_cause(e)}")

    def open_item(self, path: str) -> None:
        """Open a group (list it) or a dataset (describe it, preview it)."""
        import h5py

        try:
            obj = self.h5file[path]
        except (KeyError, OSError) as e:
            self.status.problem(f"{path}: {e}")
            return
        if isinstance(obj, h5py.Group):
            self._safely(self.open_group, obj.name)
        else:
            self._safely(self.show_dataset, obj.name)

    # -- datasets and frames --------------------------------------------------------------------
    def show_dataset(self, path: str) -> None:
        ds = self.h5file[path]
        self._clear_preview()
        self.dataset_path = path
        if ds.shape is None:  # h5py.Empty: a dataset without data, only attributes
            self.info.value = f"<b>{esc(path)}</b> empty dataset ({esc(ds.dtype)})" + "".join(
                f"<br>@{esc(k)} = {esc(_attr(v))}" for k, v in list(ds.attrs.items())[:20])
            return
        attrs = "".join(f"<br>@{esc(k)} = {esc(_attr(v))}" for k, v in list(ds.attrs.items())[:20])
        self.info.value = (f"<b>{esc(path)}</b> shape {esc(ds.shape)} · {esc(ds.dtype)} · "
                           f"chunks {esc(ds.chunks)} · {_size(ds.size * ds.dtype.itemsize)}{attrs}")
        numeric = ds.dtype.kind in "biuf"
        if ds.ndim == 0 or not numeric:
            if ds.size <= 100:
                self.info.value += f"<br>value: <code>{esc(_attr(ds[()]))}</code>"
            return
        if ds.ndim == 1:
            n = min(ds.shape[0], self.max_line_points)
            self.image.value = preview.line_png(ds[:n], title=f"{path}[:{n}]")
            return
        self.slice_sliders = [
            W.IntSlider(value=0, min=0, max=max(0, size - 1), description=f"axis {i}", continuous_update=False,
                        layout=W.Layout(width="28em"))
            for i, size in enumerate(ds.shape[:-2])
        ]
        for s in self.slice_sliders:
            s.observe(lambda _c: self.show_frame(), names="value")
        self.slices.children = self.slice_sliders
        self.show_frame()

    @property
    def index(self) -> tuple[int, ...]:
        """The leading indices the slice picker chose."""
        return tuple(s.value for s in self.slice_sliders)

    def show_frame(self) -> None:
        """Read the chosen frame (in row blocks with a progress bar when it is large) and draw it."""
        if self.h5file is None or self.dataset_path is None:
            return
        ds = self.h5file[self.dataset_path]
        rows, cols = ds.shape[-2], ds.shape[-1]
        row_bytes = max(1, cols * ds.dtype.itemsize)
        frame_bytes = rows * row_bytes
        lead = self.index
        try:
            if frame_bytes <= self.progress_bytes:
                frame = ds[lead] if lead else ds[()]
                self.last_read_blocks = 1
            else:
                frame = self._read_in_blocks(ds, lead, rows, row_bytes)
        except Exception as e:  # a refusal mid-session (access ended) arrives wrapped by h5py
            self.frame = None
            self.status.problem(f"reading {self.dataset_path}{list(lead)}: {_cause(e)}")
            return
        self.frame = np.asarray(frame)
        self.render()

    def _read_in_blocks(self, ds, lead: tuple[int, ...], rows: int, row_bytes: int) -> np.ndarray:
        block = max(1, self.progress_bytes // row_bytes)
        if ds.chunks:  # whole chunks per block: no chunk is fetched twice
            step = ds.chunks[-2]
            block = max(step, block // step * step)
        out = np.empty((rows, ds.shape[-1]), dtype=ds.dtype)
        self.progress.max, self.progress.value = rows, 0
        self.progress.layout.visibility = "visible"
        blocks = 0
        try:
            for start in range(0, rows, block):
                stop = min(rows, start + block)
                out[start:stop] = ds[(*lead, slice(start, stop), slice(None))]
                blocks += 1
                self.progress.value = stop
        finally:
            self.progress.layout.visibility = "hidden"
        self.last_read_blocks = blocks
        return out

    def render(self) -> None:
        """Draw the current frame and its histogram with the current contrast controls."""
        if self.frame is None or self.frame.ndim != 2:
            return
        low, high = self.contrast.value
        vmin, vmax = preview.contrast_limits(self.frame, low, high)
        title = f"{self.dataset_path}{list(self.index) if self.index else ''}"
        self.image.value = preview.frame_png(self.frame, vmin, vmax, cmap=self.cmap.value, log=self.log_scale.value,
                                             title=title, max_pixels=self.max_pixels)
        self.histogram.value = preview.histogram_png(self.frame, vmin, vmax)
        self.limits = (vmin, vmax)
        self.status.info(f"frame {list(self.index)} of {self.dataset_path}: display {vmin:g} … {vmax:g}")

    def _clear_preview(self) -> None:
        self.frame = None
        self.dataset_path = None
        self.slice_sliders = []
        self.slices.children = []
        self.image.value = b""
        self.histogram.value = b""

    def close(self) -> None:
        self._close_file()
        super().close()

    # -- conveniences for notebooks ----------------------------------------------------------------
    def show(self, exid: str, path: str | None = None, item: str | None = None) -> ExperimentBrowser:
        """Jump to an experiment, a file in it, and an HDF5 group or dataset in that file."""
        self.experiments.value = exid
        if path is not None:
            self.files.value = path
            if item is not None and self.h5file is not None:
                self.open_item(item)
        return self


def _attr(value) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.ndarray) and value.size > 20:
        return f"array {value.shape} {value.dtype}"
    return str(value)


def _cause(e: BaseException) -> str:
    """The service's reason, when h5py wrapped a refusal of the client."""
    seen = e
    while seen is not None:
        if isinstance(seen, LabvaultError):
            return (seen.reason or seen.error) + (f" ({seen.rule})" if seen.rule else "")
        seen = seen.__cause__ or seen.__context__
    return str(e)

