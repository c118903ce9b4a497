"""The self-contained HTML report of a cleaning: the suspects beside their anomaly maps, the
borderline kept images, the score histogram with its cut, the settings and the skipped files.
Images are embedded as PNG data URIs, so the page is one file."""

from __future__ import annotations

import base64
import html
import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from sroc.datasets.layout import read_image

if TYPE_CHECKING:
    from sroc.clean.pipeline import CleanRun

_THUMBNAIL_PX = 160
_BORDERLINE_SHOWN = 12


def _png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _thumbnail(path: str) -> Image.Image:
    image = Image.fromarray(read_image(path))
    image.thumbnail((_THUMBNAIL_PX, _THUMBNAIL_PX), Image.Resampling.BILINEAR)
    return image


def _overlay(thumbnail: Image.Image, anomaly_map: np.ndarray, low: float, high: float):
    """The thumbnail beside itself with the map blended in (jet colours, opacity rising with the
    anomaly), on a colour scale shared by all suspects."""
    from matplotlib import colormaps

    level = np.clip((anomaly_map - low) / max(high - low, 1e-12), 0.0, 1.0).astype(np.float32)
    level = np.asarray(
        Image.fromarray(level, mode="F").resize(thumbnail.size, Image.Resampling.BILINEAR)
    )
    colours = colormaps["jet"](level)[:, :, :3] * 255
    alpha = 0.15 + 0.55 * level[:, :, None]
    base = np.asarray(thumbnail, dtype=np.float32)
    blended = Image.fromarray((base * (1 - alpha) + colours * alpha).astype(np.uint8))
    pair = Image.new("RGB", (thumbnail.width * 2 + 4, thumbnail.height), "white")
    pair.paste(thumbnail, (0, 0))
    pair.paste(blended, (thumbnail.width + 4, 0))
    return pair


def _histogram(run: CleanRun) -> str:
    from matplotlib.figure import Figure

    frame = run.frame
    figure = Figure(figsize=(7, 3), dpi=100)
    axes = figure.subplots()
    bins = np.histogram_bin_edges(frame["score"], bins=min(60, max(20, len(frame) // 3)))
    axes.hist(frame.loc[~frame["suspect"], "score"], bins=bins, color="tab:blue", label="kept")
    axes.hist(frame.loc[frame["suspect"], "score"], bins=bins, color="tab:red", label="suspect")
    axes.axvline(run.cut, color="black", linestyle="--", label=f"cut {run.cut:.4g}")
    axes.set_xlabel("self-score (higher = more anomalous)")
    axes.set_ylabel("images")
    axes.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(src: str, caption: str) -> str:
    return f'<figure><img src="{src}" alt=""><figcaption>{caption}</figcaption></figure>'


def _caption(row) -> str:
    return f"#{row.rank} &middot; score {row.score:.4g}<br><code>{html.escape(row.path)}</code>"


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
.grid { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; padding: 6px; border: 1px solid #ccc; max-width: 340px; }
figcaption { font-size: 12px; word-break: break-all; }
table { border-collapse: collapse; } td, th { border: 1px solid #ccc; padding: 3px 8px; }
.note { background: #fff6d6; padding: 6px 10px; }
"""


def report_html(run: CleanRun) -> str:
    """The self-contained report: suspects first (thumbnail beside its anomaly map overlay), the
    borderline kept images, the score histogram with the cut, the settings, the skipped files."""
    frame = run.frame
    suspects = frame[frame["suspect"]]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>sroc clean report</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>sroc clean: {len(suspects)} suspect(s) among {len(frame)} images</h1>",
        *(f"<p class='note'>{html.escape(note)}</p>" for note in run.notes),
        f"<h2>Suspects ({len(suspects)}), most anomalous first</h2>",
    ]
    if suspects.empty:
        parts.append("<p>No suspect: every image is kept.</p>")
    else:
        parts.append(
            "<p>Each suspect beside its anomaly map (computed against the kept images; one "
            "colour scale for all suspects, blue = typical, red = most anomalous).</p>"
        )
        if run.suspect_maps:
            stacked = np.stack(list(run.suspect_maps.values()))
            low, high = float(np.median(stacked)), float(stacked.max())
        parts.append("<div class='grid'>")
        for row in suspects.itertuples(index=False):
            thumbnail = _thumbnail(row.path)
            image = (
                _overlay(thumbnail, run.suspect_maps[row.path], low, high)
                if row.path in run.suspect_maps
                else thumbnail
            )
            parts.append(_figure(_png_data_uri(image), _caption(row)))
        parts.append("</div>")
    borderline = frame[~frame["suspect"]].head(_BORDERLINE_SHOWN)
    parts.append(f"<h2>Borderline kept images (the {len(borderline)} highest-scored)</h2>")
    parts.append("<div class='grid'>")
    for row in borderline.itertuples(index=False):
        parts.append(_figure(_png_data_uri(_thumbnail(row.path)), _caption(row)))
    parts.append("</div>")
    parts.append("<h2>Score histogram</h2>")
    parts.append(f"<img src='{_histogram(run)}' alt='histogram of the self-scores'>")
    parts.append("<h2>Settings</h2><table>")
    for key, value in run.settings.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        parts.append(f"<tr><th>{html.escape(key)}</th><td>{html.escape(shown)}</td></tr>")
    parts.append("</table>")
    if run.skipped:
        parts.append(f"<h2>Skipped unreadable files ({len(run.skipped)})</h2><ul>")
        parts.extend(f"<li>{html.escape(problem)}</li>" for _, problem in run.skipped)
        parts.append("</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)
