"""Frame previews and histograms rendered to PNG with matplotlib's Agg canvas (no pyplot, no
global backend): what :class:`labvault.widgets.ExperimentBrowser` shows."""

from __future__ import annotations

import io

import numpy as np
from matplotlib import colors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def contrast_limits(frame: np.ndarray, low: float, high: float) -> tuple[float, float]:
    """Display limits at the ``low`` and ``high`` percentiles of the finite pixel values."""
    finite = frame[np.isfinite(frame)] if frame.dtype.kind == "f" else frame.ravel()
    if finite.size == 0:
        return 0.0, 1.0
    vmin, vmax = (float(v) for v in np.percentile(finite, [low, high]))
    if vmax <= vmin:
        vmax = vmin + 1.0
    return vmin, vmax


def downsample(frame: np.ndarray, max_pixels: int) -> np.ndarray:
    """Every n-th pixel so that neither side is longer than ``max_pixels`` (for display only)."""
    step = max(1, -(-max(frame.shape) // max_pixels))
    return frame[::step, ::step] if step > 1 else frame


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def frame_png(frame: np.ndarray, vmin: float, vmax: float, *, cmap: str = "viridis", log: bool = False,
              title: str = "", max_pixels: int = 1024) -> bytes:
    """The frame as a PNG image with a colour bar."""
    shown = downsample(np.asarray(frame), max_pixels)
    if log:
        positive = shown[shown > 0]
        low = max(vmin, float(positive.min()) if positive.size else 1.0, 1e-12)
        norm = colors.LogNorm(vmin=low, vmax=max(vmax, low * 10))
    else:
        norm = colors.Normalize(vmin=vmin, vmax=vmax)
    fig = Figure(figsize=(5.2, 4.4), dpi=96, layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(shown, cmap=cmap, norm=norm, interpolation="nearest", origin="upper")
    fig.colorbar(im, ax=ax, shrink=0.85)
    if title:
        ax.set_title(title, fontsize=9)
    return _png(fig)


def histogram_png(frame: np.ndarray, vmin: float, vmax: float, *, bins: int = 256) -> bytes:
    """A log-count histogram of the pixel values, with the contrast limits marked."""
    values = np.asarray(frame).ravel()
    if values.dtype.kind == "f":
        values = values[np.isfinite(values)]
    fig = Figure(figsize=(5.2, 2.2), dpi=96, layout="constrained")
    ax = fig.add_subplot()
    if values.size:
        counts, edges = np.histogram(values, bins=bins)
        ax.stairs(counts, edges, fill=True, color="#4c72b0")
        ax.set_yscale("log")
    ax.axvline(vmin, color="#c44e52", lw=1)
    ax.axvline(vmax, color="#c44e52", lw=1)
    ax.set_xlabel("pixel value", fontsize=8)
    ax.set_ylabel("pixels", fontsize=8)
    ax.tick_params(labelsize=7)
    return _png(fig)


def line_png(values: np.ndarray, title: str = "") -> bytes:
    """A 1-D dataset as a line plot."""
    fig = Figure(figsize=(5.2, 2.6), dpi=96, layout="constrained")
    ax = fig.add_subplot()
    ax.plot(np.asarray(values), lw=1)
    if title:
        ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    return _png(fig)
