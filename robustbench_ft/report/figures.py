"""Effective-robustness scatter plots: shift accuracy against reference accuracy.

The axes use the baseline's transform (logit by default): points are plotted in transformed
coordinates, where the baseline trend is a straight line, and the ticks are labelled in percent.
One figure shows, for one shift (or the shift average): the baseline models (grey dots), the
baseline fit with its bootstrap band, y = x, and the candidates — each WiSE-FT curve joined in
order of α from the zero-shot endpoint (star) to the fine-tuned one (diamond), other candidates
coloured by method.

Figures are built with the object-oriented API (``matplotlib.figure.Figure`` rendered by Agg), so
rendering a report never touches pyplot's global state or the user's interactive backend.
"""
from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from robustbench_ft.results import ResultRecord
from robustbench_ft.robustness.axes import inverse_transform, transform
from robustbench_ft.robustness.baseline import SHIFT_AVG, Baseline, fit_x, shift_score
from robustbench_ft.robustness.fits import Fit, PiecewiseFit, fit_linear

DPI = 110
FIGSIZE = (5.4, 4.6)
N_BOOT = 1000
BAND_LEVEL = 0.95

BASELINE_DOT = "#a3a8ae"
BASELINE_LINE = "#3b4046"
BAND = "#9aa3ad"
DIAGONAL = "#9aa0a6"
ZEROSHOT = "#f0a202"
CURVE_COLORS = ("#1f6fb4", "#d1495b", "#2a9d8f", "#8e5ea2", "#e07b00", "#4e6e58")
OTHER_COLORS = ("#6c4f9e", "#c2571a", "#2f7ebc", "#8a6d1e", "#b5446e", "#3c8d5c", "#5d6d7e")

# Percent ticks for non-linear axes, densest first: the first set with at most MAX_TICKS ticks in
# the axis range is used, so a narrow range gets 60/70/80 and a wide one 1/10/50/90/99.
TICK_SETS = (
    (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 98, 99, 99.5, 99.8, 99.9, 99.95, 99.99),
    (0.1, 1, 5, 10, 30, 50, 70, 90, 95, 99, 99.9, 99.99),
    (0.01, 0.1, 1, 10, 50, 90, 99, 99.9, 99.99),
)
MAX_TICKS = 9
MAX_LABEL = 40
MAX_AXIS_LABEL = 60  # an axis label spans the whole plot


def mpl_text(text: str, limit: int = MAX_LABEL) -> str:
    """User text made literal for matplotlib: ``$`` would start mathtext (and a malformed formula
    fails at draw time), so it is escaped; long names are shortened to keep legends readable."""
    text = str(text)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text.replace("$", r"\$")


def percent_ticks(lo: float, hi: float, kind: str) -> list[float]:
    """Tick positions, in percent, for an axis spanning [lo, hi] in ``kind`` coordinates."""
    acc_lo, acc_hi = (float(v) * 100 for v in inverse_transform([lo, hi], kind))
    if kind != "linear":
        for ticks in TICK_SETS:
            inside = [p for p in ticks if acc_lo <= p <= acc_hi]
            if len(inside) <= MAX_TICKS:
                break
        if len(inside) >= 3:
            return inside
    # a narrow range (or a linear axis): evenly spaced percent values
    ticks = MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]).tick_values(acc_lo, acc_hi)
    return [float(t) for t in ticks if max(acc_lo, 0.0) <= t <= min(acc_hi, 100.0)]


def _format_percent(p: float) -> str:
    return f"{p:.4g}"


def _set_percent_axis(ax, axis: str, lo: float, hi: float, kind: str) -> None:
    ticks = percent_ticks(lo, hi, kind)
    positions = transform(np.asarray(ticks) / 100.0, kind) if ticks else []
    set_lim, set_ticks = (ax.set_xlim, ax.set_xticks) if axis == "x" else (ax.set_ylim, ax.set_yticks)
    set_lim(lo, hi)
    set_ticks(positions, [_format_percent(p) for p in ticks])


MIN_SPAN = {"linear": 0.1, "logit": 0.5, "probit": 0.3}  # about 10-12 points around 50 %


def _limits(values: np.ndarray, kind: str) -> tuple[float, float]:
    """Padded axis range in transformed coordinates, never narrower than ``MIN_SPAN``."""
    lo, hi = float(values.min()), float(values.max())
    span = max(hi - lo, MIN_SPAN[kind])
    mid = (lo + hi) / 2
    lo, hi = mid - span / 2, mid + span / 2
    return lo - 0.08 * span, hi + 0.08 * span


@dataclass(frozen=True)
class _Point:
    x: float
    y: float
    record: ResultRecord

    @property
    def alpha(self) -> float | None:
        a = self.record.tags.get("alpha")
        return float(a) if isinstance(a, (int, float)) and not isinstance(a, bool) else None

    @property
    def endpoint(self) -> str | None:
        return self.record.tags.get("endpoint")


def _points(records: Sequence[ResultRecord], key: str, avg_shifts: Sequence[str], fit: Fit | None) -> list[_Point]:
    """Records that have both coordinates; x is the fit's x (a class-subset reference accuracy for
    some shifts), so points and trend line share one axis."""
    out = []
    for r in records:
        y = shift_score(r, key, avg_shifts)
        x = fit_x(r, fit) if fit is not None else (r.reference_score if r.reference in r.metrics else None)
        if y is not None and x is not None:
            out.append(_Point(x, y, r))
    return out


def scatter_figure(
    records: Sequence[ResultRecord],
    key: str,
    *,
    avg_shifts: Sequence[str],
    baseline: Baseline | None,
    kind: str = "logit",
    title: str = "",
    n_boot: int = N_BOOT,
) -> Figure:
    """Scatter plot for shift ``key`` (or ``SHIFT_AVG``, the mean over ``avg_shifts``)."""
    fit = baseline.fits.get(key) if baseline is not None else None
    pts = _points(records, key, avg_shifts, fit)
    base_pts = [p for p in pts if p.record.kind == "baseline"]
    cand_pts = [p for p in pts if p.record.kind != "baseline"]
    if not base_pts and baseline is not None and key in baseline.points:
        stored = baseline.points[key]
        base_xy = np.array([stored.x, stored.y], dtype=float)
    else:
        base_xy = np.array([[p.x for p in base_pts], [p.y for p in base_pts]], dtype=float).reshape(2, -1)

    # fixed margins rather than constrained layout: the layout solver was a quarter of render time
    fig = Figure(figsize=FIGSIZE, dpi=DPI)
    fig.subplots_adjust(left=0.125, right=0.975, bottom=0.115, top=0.925)
    ax = fig.add_subplot()
    T = lambda a: transform(a, kind)  # noqa: E731

    all_x = np.concatenate([T(base_xy[0]), T([p.x for p in cand_pts])])
    all_y = np.concatenate([T(base_xy[1]), T([p.y for p in cand_pts])])
    if all_x.size == 0:
        ax.text(0.5, 0.5, "no models report this dataset", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    xlim, ylim = _limits(all_x, kind), _limits(all_y, kind)
    handles: list = []

    # y = x over the whole visible square
    lo, hi = min(xlim[0], ylim[0]), max(xlim[1], ylim[1])
    handles += ax.plot([lo, hi], [lo, hi], ls="--", lw=1, color=DIAGONAL, label="y = x", zorder=1)

    if fit is not None:
        z0, z1 = T([0.0, 1.0])  # a padded linear axis reaches past 0 % or 100 %; the fit stops there
        zgrid = np.linspace(max(xlim[0], z0), min(xlim[1], z1), 120)
        if key in baseline.points and n_boot:
            band_lo, band_hi = baseline.band(key, inverse_transform(zgrid, kind), n_boot=n_boot, level=BAND_LEVEL)
            handles.append(ax.fill_between(zgrid, T(band_lo), T(band_hi), color=BAND, alpha=0.28, lw=0, zorder=1,
                                           label=f"{BAND_LEVEL:.0%} bootstrap band"))
        zfit = T(fit.predict(inverse_transform(zgrid, kind)))
        if isinstance(fit, PiecewiseFit):  # the pieces need not meet: no line drawn across a pivot
            zfit[np.flatnonzero(np.diff(fit.piece_of(inverse_transform(zgrid, kind))))] = np.nan
        handles += ax.plot(zgrid, zfit, color=BASELINE_LINE, lw=1.6, zorder=2,
                           label=f"baseline fit{' (piecewise)' if isinstance(fit, PiecewiseFit) else ''} "
                                 f"(r = {fit.r:.2f}, n = {fit.n})")
    if base_xy.size:
        handles.append(ax.scatter(T(base_xy[0]), T(base_xy[1]), s=18, color=BASELINE_DOT, edgecolor="white",
                                  lw=0.4, zorder=3, label=f"baseline models ({base_xy.shape[1]})"))

    handles += _zeroshot_trend(ax, cand_pts, kind)
    handles += _draw_candidates(ax, cand_pts, T)

    _set_percent_axis(ax, "x", *xlim, kind)
    _set_percent_axis(ax, "y", *ylim, kind)
    ref = cand_pts[0].record.reference if cand_pts else (fit.x_dataset if fit else "reference")
    scale = "" if kind == "linear" else f", {kind} scale"
    if fit is not None and fit.x_metric:  # "top1@imagenet-r": the reference on that shift's classes
        ref = f"{ref} on {fit.x_metric.partition('@')[2] or fit.x_metric} classes"
    ax.set_xlabel(mpl_text(f"{ref} accuracy (%{scale})", MAX_AXIS_LABEL))
    ax.set_ylabel(mpl_text(("shift-average" if key == SHIFT_AVG else key) + f" accuracy (%{scale})", MAX_AXIS_LABEL))
    ax.set_title(mpl_text(title or key), fontsize=11, loc="left")
    ax.grid(True, color="#e6e8eb", lw=0.6, zorder=0)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.92, borderpad=0.5,
              handlelength=1.6, labelspacing=0.35)
    return fig


MIN_TREND_MODELS = 3  # a zero-shot trend is drawn through at least this many models' zero-shot points


def _zeroshot_trend(ax, pts: list[_Point], kind: str) -> list:
    """The zero-shot models' own trend (a model x pretrained grid): a least-squares line in ``kind``
    coordinates through one zero-shot point per model, over their x range, as the effective-robustness
    literature draws zero-shot CLIP models beside the standard-training baseline (Radford et al. 2021,
    Fig. 13; Taori et al. 2020's fit applied to these points)."""
    zs = {(p.record.model, p.record.pretrained): p for p in pts if p.endpoint == "zeroshot"}
    if len(zs) < MIN_TREND_MODELS:
        return []
    xs, ys = [p.x for p in zs.values()], [p.y for p in zs.values()]
    try:
        fit = fit_linear(xs, ys, kind)
    except ValueError:  # coincident x values: no slope
        return []
    tx = transform(np.asarray(xs), kind)
    grid = np.linspace(tx.min(), tx.max(), 50)
    return ax.plot(grid, fit.slope * grid + fit.intercept, ls="--", lw=1.4, color=ZEROSHOT, zorder=3,
                   label=f"zero-shot trend ({len(zs)} models, r = {fit.r:.2f})")


def _curve_key(record: ResultRecord, several_models: bool) -> str:
    """The curve a point is on: its tag, and in a multi-model report the model (each has its own curve)."""
    curve = record.tags["curve"]
    return f"{record.model} {record.pretrained}: {curve}" if several_models else curve


def _draw_candidates(ax, pts: list[_Point], T) -> list:
    """Curves (joined in α order, α annotated), endpoints, then other candidates by method."""
    handles: list = []
    curves: dict[str, list[_Point]] = defaultdict(list)
    others: dict[tuple[str, str], list[_Point]] = defaultdict(list)
    several = len({(p.record.model, p.record.pretrained) for p in pts}) > 1
    for p in pts:
        if isinstance(p.record.tags.get("curve"), str):
            curves[_curve_key(p.record, several)].append(p)
        elif p.endpoint is None:
            others[(p.record.kind, p.record.method)].append(p)

    for i, (curve, members) in enumerate(curves.items()):
        color = CURVE_COLORS[i % len(CURVE_COLORS)]
        members.sort(key=lambda p: (p.alpha if p.alpha is not None else np.inf, p.record.candidate))
        xs, ys = T([p.x for p in members]), T([p.y for p in members])
        handles += ax.plot(xs, ys, "-o", color=color, ms=4, lw=1.5, zorder=4, label=mpl_text(f"α curve: {curve}"))
        interior = [(x, y, p) for x, y, p in zip(xs, ys, members) if p.endpoint is None and p.alpha is not None]
        step = max(1, -(-len(interior) // 9))
        for x, y, p in interior[::step]:
            ax.annotate(f"α={p.alpha:g}", (x, y), xytext=(5, -9), textcoords="offset points",
                        fontsize=6.5, color=color, zorder=6)

    endpoints = {}
    for p in pts:
        if p.endpoint in ("zeroshot", "finetuned"):
            endpoints.setdefault(p.record.record_id, p)
    for p in endpoints.values():
        x, y = T(p.x), T(p.y)
        if p.endpoint == "zeroshot":
            ax.scatter(x, y, marker="*", s=190, color=ZEROSHOT, edgecolor="black", lw=0.6, zorder=7)
        else:
            ax.scatter(x, y, marker="D", s=46, color="#2b2d42", edgecolor="white", lw=0.6, zorder=7)
    kinds = {p.endpoint for p in endpoints.values()}
    if "zeroshot" in kinds:
        handles.append(Line2D([], [], marker="*", ls="", ms=12, color=ZEROSHOT, mec="black", mew=0.6,
                              label="zero-shot (α = 0)"))
    if "finetuned" in kinds:
        handles.append(Line2D([], [], marker="D", ls="", ms=6, color="#2b2d42", mec="white",
                              label="fine-tuned (α = 1)"))

    for i, ((kind, method), members) in enumerate(sorted(others.items())):
        color = OTHER_COLORS[i % len(OTHER_COLORS)]
        published = kind == "published"
        handles.append(ax.scatter(
            T([p.x for p in members]), T([p.y for p in members]), marker="^" if published else "o", s=34,
            facecolor="none" if published else color, edgecolor=color, lw=1.2, zorder=5,
            label=mpl_text(f"{method} (published)" if published else method)))
    return handles


TRAIN_PANELS = (("loss", "training loss", "#1f6fb4"), ("lr", "learning rate", "#2a9d8f"),
                ("grad_norm", "gradient norm (before clipping)", "#d1495b"))


def training_figure(curve: dict, title: str) -> Figure:
    """A fine-tuning run's curve (``ResultRecord.training["curve"]``): loss, learning rate and gradient norm
    against the optimisation step, one panel each."""
    fig = Figure(figsize=(FIGSIZE[0], FIGSIZE[1] * 1.15), dpi=DPI)
    fig.subplots_adjust(left=0.16, right=0.97, bottom=0.1, top=0.92, hspace=0.35)
    axes = fig.subplots(len(TRAIN_PANELS), 1, sharex=True)
    steps = np.asarray(curve["step"], dtype=float)
    for ax, (key, label, color) in zip(axes, TRAIN_PANELS):
        values = np.asarray([np.nan if v is None else v for v in curve[key]], dtype=float)
        ax.plot(steps, values, color=color, lw=1.2)
        ax.set_ylabel(label, fontsize=7.5)
        ax.grid(True, color="#e6e8eb", lw=0.6)
        ax.tick_params(labelsize=7)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    axes[-1].set_xlabel("optimisation step", fontsize=8)
    axes[0].set_title(mpl_text(title, MAX_AXIS_LABEL), fontsize=10, loc="left")
    return fig


def figure_bytes(fig: Figure) -> tuple[bytes, bytes]:
    """(PNG, SVG) encodings of ``fig``; the SVG is deterministic (no date, fixed id salt) so that
    re-rendering unchanged results gives identical files."""
    png, svg = io.BytesIO(), io.BytesIO()
    fig.savefig(png, format="png", dpi=DPI, facecolor="white")
    with matplotlib.rc_context({"svg.hashsalt": "robustbench-ft", "svg.fonttype": "path"}):
        fig.savefig(svg, format="svg", metadata={"Date": None}, facecolor="white")
    return png.getvalue(), svg.getvalue()
