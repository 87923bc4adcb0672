"""``report.html``: the purification report as one self-contained page people want to read.

``report.json`` is the record machines read (its schema is in ``docs/report-schema.md``);
this module turns the same dict into a page a person can open from an e-mail attachment, a
CI artifact or an air-gapped machine. That is why the page is a single file with inline CSS,
no JavaScript and no external URL, and why every plot is a PNG embedded as a ``data:`` URI.

Every section appears only when its data is in the report: a run without ``--eval-data``
has no ACC/ASR section, a fixed λ has no selection evidence, and older or partial reports
(fields missing or ``null``) still render. Every string that comes from the report (site
names, paths, class names, attack parameters) is HTML-escaped, since users choose them.

Plots use matplotlib's object-oriented :class:`~matplotlib.figure.Figure` with the Agg
canvas, never ``pyplot``: no global figure registry to leak into, no display needed, no
backend switched under a caller's feet, and safe in a worker thread (the pattern
matplotlib documents for web servers). matplotlib is imported only when a page is rendered,
so importing the engine stays cheap.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from clipguard.files import write_text
from clipguard.stages import TIMED

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["render_html", "write_html"]

DPI = 144
"""PNG resolution; images are shown at 96 CSS px per inch, so they stay sharp on HiDPI screens."""
MAX_HISTOGRAMS = 8
"""More histograms than this make the page long without telling more; the engine sends the worst sites."""
HASH_CHARS = 12

TIMING_LABELS = {**{stage.timing_key: stage.label for stage in TIMED}, "total_s": "total"}

BEFORE_COLOR = "#9aa5b1"
AFTER_COLOR = "#2563eb"
ACC_COLOR = "#2563eb"
ASR_COLOR = "#dc2626"
RA_COLOR = "#059669"
BOUND_COLOR = "#f59e0b"

CSS = """
:root { --fg:#1f2933; --muted:#616e7c; --line:#e4e7eb; --bg:#f7f8fa; --good:#047857; --bad:#b91c1c;
  --unsure:#b45309; }
* { box-sizing: border-box; }
body { margin:0; background:var(--bg); color:var(--fg);
  font:15px/1.5 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif; }
main { max-width:1080px; margin:0 auto; padding:28px 24px 48px; }
header h1 { margin:0 0 4px; font-size:26px; }
header .sub { color:var(--muted); margin:0 0 18px; }
section { background:#fff; border:1px solid var(--line); border-radius:8px; padding:18px 22px; margin:18px 0; }
h2 { font-size:19px; margin:0 0 12px; }
h3 { font-size:15px; margin:16px 0 8px; color:var(--muted); font-weight:600; }
p.note { color:var(--muted); margin:6px 0 10px; font-size:14px; }
table { border-collapse:collapse; width:100%; font-size:14px; }
th, td { text-align:left; padding:5px 10px; border-bottom:1px solid var(--line); vertical-align:top; }
th { color:var(--muted); font-weight:600; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
table.kv th { width:170px; }
table.kv td { word-break:break-all; }
tbody tr:nth-child(even) { background:#fafbfc; }
code, .mono { font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; font-size:13px; }
.cards { display:flex; flex-wrap:wrap; gap:12px; margin:0 0 6px; }
.card { flex:1 1 180px; background:#fff; border:1px solid var(--line); border-radius:8px; padding:12px 16px; }
.card .label { color:var(--muted); font-size:13px; }
.card .value { font-size:22px; font-weight:600; font-variant-numeric:tabular-nums; }
.card .value .arrow { color:var(--muted); font-weight:400; padding:0 4px; }
.good { color:var(--good); } .bad { color:var(--bad); }
.ok { color:var(--good); font-weight:600; } .fail { color:var(--bad); font-weight:600; }
.warn { color:var(--unsure); font-weight:600; }
p.verdict { font-size:17px; }
figure { margin:12px 0; text-align:center; }
figure img { max-width:100%; height:auto; }
.bar { display:inline-block; height:9px; background:#93c5fd; border-radius:2px; vertical-align:middle; }
.scroll { max-height:420px; overflow-y:auto; }
footer { color:var(--muted); font-size:13px; text-align:center; margin-top:24px; }
"""


# --------------------------------------------------------------------------- formatting


def _esc(value: object) -> str:
    """Escape anything for HTML text and attribute values; ``None`` becomes an empty string."""
    return "" if value is None else html.escape(str(value), quote=True)


def _num(value: object) -> float | None:
    """A finite float, or ``None`` for missing, non-numeric, NaN or infinite values."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value) if math.isfinite(value) else None


def _pct(value: object, digits: int = 2) -> str:
    """A share in [0, 1] as ``93.41%``; the way every accuracy-like number appears on the page."""
    v = _num(value)
    return "—" if v is None else f"{100 * v:.{digits}f}%"


def _delta_pp(before: object, after: object, higher_is_better: bool) -> str:
    """Change in percentage points, coloured by whether it is good news for the defender."""
    b, a = _num(before), _num(after)
    if b is None or a is None:
        return "—"
    d = 100 * (a - b)
    if abs(d) < 0.005:
        return "±0.00 pp"
    good = (d > 0) == higher_is_better
    return f'<span class="{"good" if good else "bad"}">{d:+.2f} pp</span>'


def _lam(value: object) -> str:
    v = _num(value)
    return "—" if v is None else f"{v:g}"


def _seconds(value: object) -> str:
    v = _num(value)
    if v is None:
        return "—"
    if v >= 120:
        return f"{int(v // 60)} min {v % 60:.0f} s"
    return f"{v:.2f} s" if v < 10 else f"{v:.1f} s"


def _short_hash(value: object) -> str:
    """First characters of a hash, the full one in a tooltip: enough to compare by eye."""
    if not value:
        return "—"
    full = str(value)
    shown = full if len(full) <= HASH_CHARS else full[:HASH_CHARS] + "…"
    return f'<span class="mono" title="{_esc(full)}">{_esc(shown)}</span>'


def _mpl(text: object, limit: int = 48) -> str:
    """Text for a matplotlib label: ``$`` would start mathtext (and can raise), long names keep their tail."""
    s = str(text)
    if len(s) > limit:
        s = "…" + s[-(limit - 1) :]
    return s.replace("$", r"\$")


def _dict(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _list(value: object) -> list:
    return list(value) if isinstance(value, (list, tuple)) else []


def _class_names(report: Mapping[str, Any], n: int) -> list[str]:
    names = [str(c) for c in _list(_dict(_dict(report.get("inputs")).get("data")).get("classes"))]
    return [names[i] if i < len(names) else str(i) for i in range(n)]


def _kv_table(rows: Iterable[tuple[str, str]]) -> str:
    """Two-column table; values are already-escaped HTML."""
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv"><tbody>{body}</tbody></table>'


def _inline(value: object) -> str:
    """A JSON-ish value (attack parameters, shapes) as short escaped text."""
    if isinstance(value, str):
        return _esc(value)
    try:
        return _esc(json.dumps(value, ensure_ascii=False, sort_keys=True))
    except (TypeError, ValueError):
        return _esc(repr(value))


# --------------------------------------------------------------------------- plots


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _img(fig: Figure, alt: str) -> str:
    """Embed the figure as a base64 PNG, shown at 96 px per inch, then release it."""
    buf = io.BytesIO()
    # No "Software" metadata: it carries a matplotlib URL and makes the bytes version-dependent.
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None}, facecolor="white")
    width = round(fig.get_figwidth() * 96)
    fig.clear()
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" width="{width}" alt="{_esc(alt)}"></figure>'


def _style(ax: Any) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", color="#e4e7eb", linewidth=0.8)
    ax.set_axisbelow(True)


def _metrics_plot(metrics: list[tuple[str, float | None, float | None]]) -> str:
    """Grouped bars, before vs after, with the numbers printed on the bars."""
    fig = _new_figure(max(4.0, 1.6 * len(metrics) + 1.8), 3.3)
    ax = fig.add_subplot()
    width = 0.38
    for offset, idx, label, color in ((-width / 2, 1, "before", BEFORE_COLOR), (width / 2, 2, "after", AFTER_COLOR)):
        xs = [i + offset for i in range(len(metrics))]
        column = [m[1] if idx == 1 else m[2] for m in metrics]
        vals = [100 * v if v is not None else 0.0 for v in column]
        bars = ax.bar(xs, vals, width, label=label, color=color)
        ax.bar_label(
            bars,
            labels=[f"{v:.1f}" if c is not None else "" for v, c in zip(vals, column, strict=True)],
            fontsize=8,
            padding=2,
        )
    ax.set_xticks(range(len(metrics)), [m[0] for m in metrics])
    ax.set_ylim(0, 112)
    ax.set_ylabel("%")
    ax.legend(loc="upper center", ncols=2, frameon=False, bbox_to_anchor=(0.5, 1.12))
    _style(ax)
    return _img(fig, "ACC, ASR and RA before and after purification")


def _eval_sweep_plot(rows: list[Mapping[str, Any]], chosen: float | None) -> str:
    """Test-set ACC and ASR against λ: the trade-off the chosen λ sits on."""
    rows = sorted((r for r in rows if _num(r.get("lam")) is not None), key=lambda r: float(r["lam"]))
    fig = _new_figure(7.6, 3.4)
    ax = fig.add_subplot()
    lams = [float(r["lam"]) for r in rows]
    for key, label, color, marker in (
        ("acc", "ACC", ACC_COLOR, "o"),
        ("asr", "ASR", ASR_COLOR, "s"),
        ("ra", "RA", RA_COLOR, "^"),
    ):
        pts = [(lam, 100 * v) for lam, r in zip(lams, rows, strict=True) if (v := _num(r.get(key))) is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker=marker, markersize=4, color=color, label=label)
    if chosen is not None:
        ax.axvline(chosen, color="#1f2933", linestyle="--", linewidth=1)
        ax.annotate(
            f"chosen λ = {chosen:g}", (chosen, 103), xytext=(4, 0), textcoords="offset points", fontsize=8, va="center"
        )
    ax.set_xlabel("λ (bound = μ + λσ; smaller clips harder)")
    ax.set_ylabel("% of test images")
    ax.set_ylim(-3, 108)
    ax.legend(frameon=False, loc="center right")
    _style(ax)
    return _img(fig, "ACC and ASR on the evaluation data as a function of λ")


def _criterion_key(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """The number the selection rule compared with its tolerance; its key depends on the rule's version."""
    for key in ("mean_drop_others", "others_min_agreement"):
        if any(key in r for r in rows):
            return key
    return None


def _selection_plot(selection: Mapping[str, Any]) -> str:
    """The training-data evidence behind ``--lam auto``: what was measured and where the rule stopped.

    Left axis: how much of the model's behaviour on its own training data survives each λ.
    Right axis: the rule's criterion against its tolerance, which is what actually decided.
    """
    rows = sorted(
        (r for r in _list(selection.get("sweep")) if isinstance(r, Mapping) and _num(r.get("lam")) is not None),
        key=lambda r: float(r["lam"]),
    )
    lams = [float(r["lam"]) for r in rows]
    fig = _new_figure(7.6, 3.4)
    ax = fig.add_subplot()
    lines = []
    series = (
        ("agreement", "agreement with the suspect model", ACC_COLOR, "o"),
        ("train_acc", "training accuracy", RA_COLOR, "^"),
    )
    for key, label, color, marker in series:
        pts = [(lam, 100 * v) for lam, r in zip(lams, rows, strict=True) if (v := _num(r.get(key))) is not None]
        if pts:
            lines += ax.plot(*zip(*pts, strict=True), marker=marker, markersize=4, color=color, label=label)
    ax.set_ylim(0, 105)
    crit, tol = _criterion_key(rows), _num(selection.get("tolerance"))
    if crit is not None:
        pts = [(lam, 100 * v) for lam, r in zip(lams, rows, strict=True) if (v := _num(r.get(crit))) is not None]
        if pts:
            ax2 = ax.twinx()
            label = (
                "mean accuracy drop, other classes" if crit == "mean_drop_others" else "min agreement, other classes"
            )
            lines += ax2.plot(*zip(*pts, strict=True), marker="s", markersize=4, color=BOUND_COLOR, label=label)
            if tol is not None:
                limit = 100 * (tol if crit == "mean_drop_others" else 1 - tol)
                lines.append(
                    ax2.axhline(limit, color=BOUND_COLOR, linestyle=":", linewidth=1.2, label=f"tolerance ({limit:g}%)")
                )
            ax2.set_ylabel("criterion, %", color="#b45309")
            ax2.tick_params(colors="#b45309")
            ax2.set_ylim(bottom=0)
            ax2.spines[["top"]].set_visible(False)
    chosen = _num(selection.get("chosen"))
    if chosen is not None:
        ax.axvline(chosen, color="#1f2933", linestyle="--", linewidth=1)
        ax.annotate(
            f"accepted λ = {chosen:g}",
            (chosen, 0.03),
            xycoords=("data", "axes fraction"),
            xytext=(-4, 0),
            textcoords="offset points",
            fontsize=8,
            ha="right",
        )
    ax.set_xlabel("λ")
    ax.set_ylabel("% of training samples")
    fig.legend(handles=lines, frameon=False, loc="outside lower center", ncols=2, fontsize=8)
    _style(ax)
    return _img(fig, "training-data evidence for the automatic λ: agreement and the rule's criterion against λ")


def _clip_fraction_plot(sites: list[Mapping[str, Any]]) -> str:
    """Horizontal bars in execution order (top = first layer), so depth reads top to bottom."""
    n = len(sites)
    fig = _new_figure(8.0, 0.9 + 0.24 * n)
    ax = fig.add_subplot()
    vals = [100 * (_num(s.get("clip_fraction")) or 0.0) for s in sites]
    ys = list(range(n))
    bars = ax.barh(ys, vals, color=AFTER_COLOR, height=0.7)
    ax.bar_label(bars, labels=[f"{v:.2f}%" for v in vals], fontsize=7, padding=3)
    ax.set_yticks(ys, [_mpl(s.get("name", "?")) for s in sites], fontsize=8, fontfamily="monospace")
    ax.invert_yaxis()
    ax.set_xlim(0, max([*vals, 0.1]) * 1.18)
    ax.set_xlabel("% of activations clipped (training subsample)")
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="x", color="#e4e7eb", linewidth=0.8)
    ax.set_axisbelow(True)
    return _img(fig, "fraction of activations clipped per site")


def _histogram_plot(items: list[tuple[str, Any, Any, float | None]]) -> str:
    """Per site: training activations (log counts) with the per-node bounds overlaid on a second axis.

    The two are on different axes because there are thousands of sampled activations but only
    one bound per node; what matters is where the bounds sit relative to the activation tail.
    """
    import numpy as np
    from matplotlib.ticker import NullLocator

    cols = 2 if len(items) > 1 else 1
    rows = math.ceil(len(items) / cols)
    fig = _new_figure(5.0 * cols, 2.7 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (name, values, bounds, fraction) in zip(axes, items, strict=False):
        lo = min(float(values.min()), float(bounds.min()) if bounds.size else float(values.min()))
        hi = max(float(values.max()), float(bounds.max()) if bounds.size else float(values.max()))
        if hi <= lo:
            hi = lo + 1.0
        edges = np.linspace(lo, hi, 61)
        ax.hist(values, bins=edges, color=AFTER_COLOR, alpha=0.85, label="activations", log=True, histtype="stepfilled")
        ax.set_ylabel("activations", fontsize=8)
        ax.yaxis.set_minor_locator(NullLocator())  # log-axis minor ticks cost time and add nothing here
        if bounds.size:
            ax2 = ax.twinx()
            ax2.hist(
                bounds, bins=edges, color=BOUND_COLOR, alpha=0.55, label="bounds (per node)", histtype="stepfilled"
            )
            ax2.set_ylabel("nodes", fontsize=8, color="#b45309")
            ax2.tick_params(labelsize=7, colors="#b45309")
            ax2.spines[["top"]].set_visible(False)
            med = float(np.median(bounds))
            ax.axvline(med, color="#b45309", linestyle="--", linewidth=1)
            above = float((values > med).mean())
            ax.text(
                0.98,
                0.95,
                f"median bound {med:.3g}\n{100 * above:.2f}% of values above it",
                transform=ax.transAxes,
                ha="right",
                va="top",
                fontsize=7,
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1.5},
            )
        title = _mpl(name, 40)
        if fraction is not None:
            title += f"  (clipped {100 * fraction:.2f}%)"
        ax.set_title(title, fontsize=9, fontfamily="monospace")
        ax.tick_params(labelsize=7)
        ax.spines[["top"]].set_visible(False)
    for ax in axes[len(items) :]:
        ax.set_visible(False)
    handles = [
        _patch(AFTER_COLOR, 0.85, "sampled training activations (log count)"),
        _patch(BOUND_COLOR, 0.55, "per-node bounds μ+λσ"),
    ]
    fig.legend(handles=handles, loc="outside upper center", ncols=2, frameon=False, fontsize=8)
    return _img(fig, "activation histograms of the most-clipped sites with their bounds")


def _patch(color: str, alpha: float, label: str) -> Any:
    from matplotlib.patches import Patch

    return Patch(facecolor=color, alpha=alpha, label=label)


# --------------------------------------------------------------------------- sections


def _header(report: Mapping[str, Any]) -> str:
    inputs = _dict(report.get("inputs"))
    model, data = _dict(inputs.get("model")), _dict(inputs.get("data"))
    arch = model.get("arch") or "model"
    selection = report.get("lam_selection")
    lam = _lam(report.get("lam"))
    lam_text = f"{lam} (auto: chosen from the training data)" if selection else lam
    size = "×".join(str(x) for x in _list(model.get("input_size")))
    classes = _list(data.get("classes"))
    rows = [
        (
            "Model",
            f"<code>{_esc(arch)}</code>"
            + (f", {_esc(model.get('num_classes'))} classes" if model.get("num_classes") is not None else "")
            + (f", input {_esc(size)}" if size else ""),
        ),
        ("Weights", f"<code>{_esc(model.get('weights') or '—')}</code> · sha256 {_short_hash(model.get('sha256'))}"),
        ("Training data", f"<code>{_esc(data.get('ref') or '—')}</code> · sha256 {_short_hash(data.get('sha256'))}"),
        (
            "Samples",
            _esc(data.get("samples", "—"))
            + (f" in {len(classes)} classes" if classes else "")
            + (
                f", images {_esc('×'.join(str(x) for x in _list(data.get('image_size'))))}"
                if _list(data.get("image_size"))
                else ""
            ),
        ),
        ("Method", f"{_esc(report.get('method') or '—')}, {_esc(report.get('granularity') or '—')} granularity"),
        ("λ", _esc(lam_text)),
        (
            "Device",
            _esc(report.get("device") or "—")
            + (f" · torch {_esc(report['torch_version'])}" if report.get("torch_version") else ""),
        ),
        ("Total time", _seconds(_dict(report.get("timings")).get("total_s"))),
        ("Created", _esc(report.get("created") or "—")),
        (
            "clipguard",
            _esc(report.get("clipguard_version") or "—")
            + (f" · schema <code>{_esc(report['schema'])}</code>" if report.get("schema") else ""),
        ),
    ]
    if model.get("mean") or model.get("std"):
        rows.insert(1, ("Normalisation", f"mean {_inline(model.get('mean'))}, std {_inline(model.get('std'))}"))
    sub = f"{_esc(arch)} purified with λ = {_esc(lam)} on {_esc(data.get('samples', '?'))} training samples"
    return (
        f'<header><h1>clipguard purification report</h1><p class="sub">{sub}</p></header>'
        f"{_cards(report)}<section><h2>Run</h2>{_kv_table(rows)}</section>"
    )


def _cards(report: Mapping[str, Any]) -> str:
    """The three numbers most readers came for, before any table."""
    ev = _dict(report.get("evaluation"))
    before, after = _dict(ev.get("before")), _dict(ev.get("after"))
    cards = []
    for key, label, higher in (("acc", "Clean accuracy (ACC)", True), ("asr", "Attack success (ASR)", False)):
        b, a = _num(before.get(key)), _num(after.get(key))
        if b is None and a is None:
            continue
        cls = "" if b is None or a is None or abs(a - b) < 5e-5 else ("good" if (a > b) == higher else "bad")
        cards.append(
            f'<div class="card"><div class="label">{label}</div><div class="value">{_pct(b)}'
            f'<span class="arrow">→</span><span class="{cls}">{_pct(a)}</span></div></div>'
        )
    if _num(ev.get("der")) is not None:
        cards.append(
            f'<div class="card"><div class="label">DER (BackdoorBench)</div>'
            f'<div class="value">{_pct(ev.get("der"))}</div></div>'
        )
    if not cards:
        return (
            '<p class="note">No evaluation in this report: give <code>--eval-data</code> (and '
            "<code>--attack</code>) to measure ACC and ASR before and after.</p>"
        )
    cards.append(
        f'<div class="card"><div class="label">λ</div><div class="value">{_esc(_lam(report.get("lam")))}'
        f"{' <small>(auto)</small>' if report.get('lam_selection') else ''}</div></div>"
    )
    return f'<div class="cards">{"".join(cards)}</div>'


def _evaluation(report: Mapping[str, Any]) -> str:
    ev = _dict(report.get("evaluation"))
    if not ev:
        return ""
    before, after = _dict(ev.get("before")), _dict(ev.get("after"))
    metrics = (
        ("acc", "ACC", "clean accuracy", True),
        ("asr", "ASR", "triggered non-target images sent to the target", False),
        ("asr_all", "ASR (all)", "as ASR, target-class images included", False),
        ("ra", "RA", "triggered non-target images still correctly classified", True),
    )
    rows, plotted = [], []
    for key, label, meaning, higher in metrics:
        b, a = before.get(key), after.get(key)
        if _num(b) is None and _num(a) is None:
            continue
        rows.append(
            f'<tr><td><b>{label}</b></td><td>{meaning}</td><td class="num">{_pct(b)}</td>'
            f'<td class="num">{_pct(a)}</td><td class="num">{_delta_pp(b, a, higher)}</td></tr>'
        )
        if key != "asr_all":
            plotted.append((label, _num(b), _num(a)))
    if _num(ev.get("der")) is not None:
        rows.append(
            f"<tr><td><b>DER</b></td><td>[max(0, ΔASR) − max(0, ΔACC) + 1] / 2</td><td></td>"
            f'<td class="num">{_pct(ev.get("der"))}</td><td></td></tr>'
        )
    data = _dict(ev.get("data"))
    facts = []
    if data:
        facts.append(
            f"Evaluated on <code>{_esc(data.get('ref') or '—')}</code> ({_esc(data.get('samples', '?'))} "
            f"images, sha256 {_short_hash(data.get('sha256'))})"
        )
    attack = ev.get("attack")
    if isinstance(attack, Mapping) and attack:
        name = attack.get("name") or attack.get("attack") or "attack"
        params = ", ".join(
            f"{_esc(k)}={_short_hash(v) if str(k).endswith('sha256') else _inline(v)}"
            for k, v in attack.items()
            if k not in ("name", "attack")
        )
        facts.append(f"trigger <b>{_esc(name)}</b>" + (f" ({params})" if params else ""))
    elif attack is None:
        facts.append("no attack given, so no ASR")
    asr_n = after.get("asr_samples") or before.get("asr_samples")
    if asr_n is not None:
        facts.append(f"ASR and RA over {_esc(asr_n)} non-target images")
    out = ["<section><h2>ACC / ASR before and after</h2>"]
    if facts:
        out.append(f'<p class="note">{"; ".join(facts)}.</p>')
    if rows:
        out.append(
            '<table><thead><tr><th>Metric</th><th>Meaning</th><th class="num">Before</th>'
            f'<th class="num">After</th><th class="num">Change</th></tr></thead><tbody>{"".join(rows)}'
            "</tbody></table>"
        )
    if plotted:
        out.append(_metrics_plot(plotted))
    out.append("</section>")
    return "".join(out)


def _lambda(report: Mapping[str, Any]) -> str:
    ev = _dict(report.get("evaluation"))
    sweep = [r for r in _list(ev.get("sweep")) if isinstance(r, Mapping)]
    selection = _dict(report.get("lam_selection"))
    sel_rows = [r for r in _list(selection.get("sweep")) if isinstance(r, Mapping)]
    if not sweep and not sel_rows:
        return ""
    out = ["<section><h2>Choosing λ</h2>"]
    if sweep:
        out.append("<h3>ACC and ASR on the evaluation data against λ</h3>")
        if ev.get("sweep_model") == "unlearned":
            out.append(
                '<p class="note">Clipping the unlearned model (method guard) at each λ; the "before" '
                "numbers above are the suspect model's.</p>"
            )
        out.append(_eval_sweep_plot(sweep, _num(report.get("lam"))))
    if sel_rows:
        out.append("<h3>Training-data evidence for <code>--lam auto</code></h3>")
        rule = selection.get("rule")
        details = []
        if rule:
            details.append(f"Rule: {_esc(rule)}")
        if _num(selection.get("tolerance")) is not None:
            details.append(f"tolerance {_pct(selection['tolerance'])}")
        if selection.get("samples") is not None:
            details.append(f"measured on {_esc(selection['samples'])} training samples")
        if _num(selection.get("train_acc_before")) is not None:
            details.append(f"training accuracy before clipping {_pct(selection['train_acc_before'])}")
        if details:
            out.append(f'<p class="note">{"; ".join(details)}.</p>')
        out.append(_selection_plot(selection))
        out.append(_selection_table(report, sel_rows))
    out.append("</section>")
    return "".join(out)


def _selection_table(report: Mapping[str, Any], rows: list[Mapping[str, Any]]) -> str:
    """Every λ the rule tried, with the number it compared against the tolerance."""
    crit = _criterion_key(rows)
    has_train = any("train_acc" in r for r in rows)
    n = 0
    for r in rows:
        per = r.get("drop_by_class") or r.get("per_class")
        n = max(n, len(_list(per)))
    names = _class_names(report, max(n, 1) if n else 0)
    head = ['<th class="num">λ</th><th class="num">agreement</th>']
    if has_train:
        head.append('<th class="num">train acc</th>')
    head.append("<th>most affected class</th>")
    if crit:
        label = "mean drop, other classes" if crit == "mean_drop_others" else "min agreement, other classes"
        head.append(f'<th class="num">{label}</th>')
    head.append("<th>accepted</th>")
    body = []
    for r in sorted(rows, key=lambda r: _num(r.get("lam")) or 0.0):
        worst = r.get("most_affected_class")
        if isinstance(worst, int) and not isinstance(worst, bool) and 0 <= worst < len(names):
            worst_text = f"{_esc(names[worst])} ({worst})"
        else:
            worst_text = _esc(worst if worst is not None else "—")
        cells = [f'<td class="num">{_lam(r.get("lam"))}</td><td class="num">{_pct(r.get("agreement"))}</td>']
        if has_train:
            cells.append(f'<td class="num">{_pct(r.get("train_acc"))}</td>')
        cells.append(f"<td>{worst_text}</td>")
        if crit:
            cells.append(f'<td class="num">{_pct(r.get(crit))}</td>')
        scored, total = _num(r.get("samples")), _num(_dict(report.get("lam_selection")).get("samples"))
        early = f" (certain after {int(scored)} images)" if scored is not None and total and scored < total else ""
        cells.append('<td class="ok">yes</td>' if r.get("accepted") else f"<td>no{_esc(early)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><thead><tr>{''.join(head)}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _sites(report: Mapping[str, Any]) -> str:
    sites = [s for s in _list(report.get("sites")) if isinstance(s, Mapping)]
    if not sites:
        return ""
    total = sum(_num(s.get("clip_fraction")) or 0.0 for s in sites)
    top = max(sites, key=lambda s: _num(s.get("clip_fraction")) or 0.0)
    note = (
        f"{len(sites)} activation sites in execution order; mean clipped share "
        f"{_pct(total / len(sites))}, most at <code>{_esc(top.get('name'))}</code> "
        f"({_pct(top.get('clip_fraction'))})."
    )
    rows = "".join(
        f'<tr><td class="num">{i}</td><td><code>{_esc(s.get("name"))}</code></td>'
        f'<td class="mono">{_esc("×".join(str(x) for x in _list(s.get("shape"))) or "—")}</td>'
        f'<td class="num">{_pct(s.get("clip_fraction"), 3)}</td></tr>'
        for i, s in enumerate(sites)
    )
    table = (
        '<details><summary>Site table</summary><div class="scroll"><table><thead><tr><th class="num">#</th>'
        '<th>site</th><th>bound shape</th><th class="num">clipped</th></tr></thead>'
        f"<tbody>{rows}</tbody></table></div></details>"
    )
    return (
        f'<section><h2>Activations clipped per site</h2><p class="note">{note}</p>'
        f"{_clip_fraction_plot(sites)}{table}</section>"
    )


def _histograms(report: Mapping[str, Any], activations: Mapping[str, Mapping[str, Any]] | None) -> str:
    if not activations:
        return ""
    import numpy as np

    fractions = {
        str(s.get("name")): _num(s.get("clip_fraction")) for s in _list(report.get("sites")) if isinstance(s, Mapping)
    }
    items = []
    for name, entry in activations.items():
        if not isinstance(entry, Mapping):
            continue
        values = np.asarray(entry.get("values", []), dtype=np.float64).ravel()
        bounds = np.asarray(entry.get("bound", []), dtype=np.float64).ravel()
        values, bounds = values[np.isfinite(values)], bounds[np.isfinite(bounds)]
        if values.size:
            items.append((str(name), values, bounds, fractions.get(str(name))))
    if not items:
        return ""
    items.sort(key=lambda it: -(it[3] or 0.0))
    items = items[:MAX_HISTOGRAMS]
    return (
        '<section><h2>Activation histograms, most-clipped sites</h2><p class="note">Sampled training '
        "activations per site (log scale) and the distribution of that site's per-node bounds; everything "
        "right of a node's bound is cut to it. A backdoor shows as a far tail that the bounds sit well "
        "inside.</p>" + _histogram_plot(items) + "</section>"
    )


def _per_class(report: Mapping[str, Any]) -> str:
    ev = _dict(report.get("evaluation"))
    before = _list(_dict(ev.get("before")).get("per_class_acc"))
    after = _list(_dict(ev.get("after")).get("per_class_acc"))
    n = max(len(before), len(after))
    if not n:
        return ""
    names = _class_names(report, n)
    pairs = [
        (_num(before[i]) if i < len(before) else None, _num(after[i]) if i < len(after) else None) for i in range(n)
    ]
    worst = max(range(n), key=lambda i: (pairs[i][0] or 0.0) - (pairs[i][1] or 0.0))
    rows = []
    for i, (b, a) in enumerate(pairs):
        bar = f'<span class="bar" style="width:{round(80 * a) if a is not None else 0}px"></span>'
        mark = " ◀ largest drop" if i == worst and b is not None and a is not None and b - a > 0.0005 else ""
        rows.append(
            f'<tr><td class="num">{i}</td><td>{_esc(names[i])}<span class="bad">{mark}</span></td>'
            f'<td class="num">{_pct(b)}</td><td class="num">{_pct(a)}</td>'
            f'<td class="num">{_delta_pp(b, a, True)}</td><td>{bar}</td></tr>'
        )
    return (
        '<section><h2>Per-class accuracy</h2><div class="scroll"><table><thead><tr><th class="num">#</th>'
        '<th>class</th><th class="num">Before</th><th class="num">After</th><th class="num">Change</th>'
        f"<th>after</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div></section>"
    )


def _detection(report: Mapping[str, Any]) -> str:
    """MM-BD's data-free verdict, when the run asked for it (``--detect``)."""
    det = _dict(report.get("detection"))
    if not det:
        return ""
    flagged = bool(det.get("flagged"))
    verdict = (
        '<span class="fail">backdoor suspected</span>' if flagged else '<span class="ok">no backdoor detected</span>'
    )
    p = _num(det.get("p_value"))
    stats = det.get("statistics") or []
    cells = "".join(f'<td class="num">{_esc(f"{float(v):.2f}")}</td>' for v in stats)
    heads = "".join(f'<th class="num">{i}</th>' for i in range(len(stats)))
    return (
        f"<section><h2>Is this model backdoored?</h2><p>{_esc(det.get('method') or 'MM-BD')}: {verdict} "
        f"(p = {'—' if p is None else f'{p:.3g}'}; most suspicious class {_esc(det.get('target'))}). "
        "The statistic per class is the largest logit margin that gradient ascent on inputs reaches; "
        "a backdoor target stands out from a Gamma fit to the others.</p>"
        + (
            f"<table><thead><tr><th>class</th>{heads}</tr></thead><tbody><tr><td>max margin</td>{cells}</tr>"
            "</tbody></table>"
            if stats
            else ""
        )
        + "</section>"
    )


VERDICT_WORDS = {
    "backdoor_found": ("fail", "Backdoor found"),
    "no_evidence": ("ok", "No evidence of a backdoor"),
    "inconclusive": ("warn", "Inconclusive"),
}


def _verdict(report: Mapping[str, Any]) -> str:
    """What was found and how sure, first: the verdict, what was done, and each candidate's evidence."""
    verdict = _dict(report.get("verdict"))
    if not verdict:
        return ""
    css, words = VERDICT_WORDS.get(str(verdict.get("status")), ("warn", str(verdict.get("status"))))
    rows = []
    for c in (_dict(x) for x in _list(verdict.get("candidates"))):
        s, g = _dict(c.get("suspects_graft")), _dict(c.get("genuine_graft"))
        state = (
            '<span class="fail">confirmed</span>' + (f" ({_esc(c.get('kind'))})" if c.get("kind") else "")
            if c.get("confirmed")
            else (
                '<span class="warn">not confirmed</span>'
                if c.get("unresolved")
                else '<span class="ok">dismissed</span>'
            )
        )
        rows.append(
            f'<tr><td class="num">{_esc(c.get("class"))}</td><td>{_esc(c.get("why_tested"))}</td>'
            f'<td class="num">{_fixed(c.get("screen_score"))}</td>'
            f'<td class="num">{_fixed(c.get("z"), 1)}</td>'
            f'<td class="num">{_fixed(c.get("whole_class_score"))}</td>'
            f'<td class="num">{_esc(c.get("suspects"))}</td>'
            f'<td class="num">{_pct(_num(s.get("broad")), 0)} / {_pct(_num(s.get("strongest")), 0)}</td>'
            f'<td class="num">{_pct(_num(g.get("broad")), 0)} / {_pct(_num(g.get("strongest")), 0)}</td>'
            f"<td>{state}</td></tr>"
        )
    table = (
        (
            '<table><thead><tr><th class="num">class</th><th>why tested</th><th class="num">split</th>'
            '<th class="num">z</th><th class="num">whole class</th><th class="num">suspects</th>'
            '<th class="num">suspects\' graft: median / best source</th>'
            '<th class="num">genuine graft</th><th>outcome</th></tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>"
        )
        if rows
        else ""
    )
    return (
        f'<section><h2>Verdict</h2><p class="verdict"><span class="{css}">{_esc(words)}</span>: '
        f"{_esc(verdict.get('summary'))}</p><p><b>Done:</b> {_esc(verdict.get('action'))}.</p>{table}"
        '<p class="note">A candidate is a class whose penultimate features split into a separate group, or '
        "whose split's smaller group carries a pattern that moves decisions. It is confirmed only when that "
        "group's per-pixel look, grafted onto images of the other classes, sends them to the class far more often "
        "than the genuine group's look does: a trigger transfers, a natural mode of a class does not. Only "
        "confirmed classes are unlearned.</p></section>"
    )


def _fixed(value: object, digits: int = 2) -> str:
    number = _num(value)
    return "—" if number is None else f"{number:.{digits}f}"


def _poison(report: Mapping[str, Any]) -> str:
    """The guard method's detection record: every class's split score and what was unlearned."""
    found = _dict(report.get("poison_detection"))
    if not found:
        return ""
    scores = _list(found.get("scores"))
    targets = set(_list(found.get("targets")))
    heads = "".join(f'<th class="num">{i}</th>' for i in range(len(scores)))
    cells = "".join(
        f'<td class="num{" fail" if i in targets else ""}">{"—" if v is None else _esc(f"{float(v):.3f}")}</td>'
        for i, v in enumerate(scores)
    )
    unl = _dict(report.get("unlearning"))
    if unl:
        rounds = "; ".join(
            f"round {_esc(r.get('round'))}: {_esc(r.get('suspects'))} suspects"
            + (f", {_esc(r['flipped_added'])} flips added" if r.get("flipped_added") is not None else "")
            for r in _list(unl.get("rounds"))
        )
        done = (
            f"{_esc(unl.get('suspects'))} training samples relabelled and unlearned ({rounds}). The purified "
            "model's weights differ from the input's; its bounds come from the training data without the "
            "suspects."
        )
    else:
        done = "Nothing was unlearned: the model was clipped as given (the paper's recipe)."
    return (
        "<section><h2>Poisoned training data</h2><p>" + done + '</p><p class="note">Per class, the '
        "penultimate features are split in two (Otsu) along the best of 36 directions in the plane of their "
        "top two principal directions, and the score is how far apart the "
        "groups are, in pooled standard deviations (one Gaussian blob: about 2.7)."
        + _screened(found)
        + "</p>"
        + (
            f"<table><thead><tr><th>class</th>{heads}</tr></thead><tbody><tr><td>split score</td>{cells}</tr>"
            "</tbody></table>"
            if scores
            else ""
        )
        + "</section>"
    )


def _screened(found: Mapping[str, Any]) -> str:
    """How much of the training data the scores were computed on, when detection screened a sample."""
    screened, total = found.get("screened"), found.get("of")
    if not isinstance(screened, int) or not isinstance(total, int) or screened >= total:
        return ""
    return (
        f" Scores from a class-balanced sample of {screened:,} of the {total:,} training samples; each "
        "candidate class was then read whole to be confirmed and to name every suspect."
    )


def _reactivation(report: Mapping[str, Any]) -> str:
    """What a short fine-tune of the purified model did (``--reactivation-check``)."""
    again = _dict(report.get("reactivation"))
    if not again:
        return ""
    protocol = _dict(again.get("protocol"))
    after = _dict(again.get("after"))
    asr = f", ASR {_pct(_num(after.get('asr')), 1)}" if "asr" in after else ""
    numbers = f"ACC {_pct(_num(after.get('acc')), 1)}{asr}; " if after else ""
    return (
        "<section><h2>Does the backdoor come back?</h2><p>After fine-tuning a copy of the purified model for "
        f"{_esc(protocol.get('epochs'))} epochs on {_esc(again.get('tuned_on'))} training images without the "
        f"suspects (lr {_esc(protocol.get('lr'))}, batch {_esc(protocol.get('batch_size'))}): {numbers}"
        f"it agrees with the purified model on {_pct(_num(again.get('agreement')), 1)} of "
        f"{_esc(again.get('agreement_samples'))} {_esc(again.get('agreement_on'))}.</p></section>"
    )


def _export(report: Mapping[str, Any]) -> str:
    checks = _dict(report.get("export"))
    if not checks:
        return ""
    rows = []
    for key, check in checks.items():
        c = _dict(check)
        ok = c.get("ok")
        status = '<span class="ok">✓ ok</span>' if ok else '<span class="fail">✗ failed</span>'
        detail = []
        if c.get("method"):
            detail.append(f"via {_esc(c['method'])}")
        if c.get("batch") is not None:
            detail.append(f"checked on a batch of {_esc(c['batch'])}")
        if c.get("error"):
            detail.append(f"<code>{_esc(c['error'])}</code>")
        diff, tol = _num(c.get("max_abs_diff")), _num(c.get("tolerance"))
        rows.append(
            f"<tr><td><b>{_esc(c.get('format') or key)}</b></td><td>{status}</td>"
            f'<td class="num">{"—" if diff is None else f"{diff:.2e}"}</td>'
            f'<td class="num">{"—" if tol is None else f"{tol:.0e}"}</td><td>{", ".join(detail)}</td></tr>'
        )
    return (
        '<section><h2>Export checks</h2><p class="note">Each artifact was loaded back and compared with the '
        "clipped model on real training images.</p><table><thead><tr><th>format</th><th>status</th>"
        '<th class="num">max |Δ logit|</th><th class="num">tolerance</th><th>details</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></section>"
    )


def _timings(report: Mapping[str, Any]) -> str:
    timings = {k: v for k, v in _dict(report.get("timings")).items() if _num(v) is not None}
    if not timings:
        return ""
    total = _num(timings.get("total_s")) or sum(float(v) for k, v in timings.items() if k != "total_s")
    rows = []
    for key, value in timings.items():
        label = TIMING_LABELS.get(key, key.removesuffix("_s").replace("_", " "))
        share = float(value) / total if total and key != "total_s" else None
        bar = f'<span class="bar" style="width:{round(160 * min(share, 1.0))}px"></span>' if share is not None else ""
        weight = ("<b>", "</b>") if key == "total_s" else ("", "")
        rows.append(
            f'<tr><td>{weight[0]}{_esc(label)}{weight[1]}</td><td class="num">{_seconds(value)}</td>'
            f'<td class="num">{_pct(share, 0) if share is not None else ""}</td><td>{bar}</td></tr>'
        )
    return (
        '<section><h2>Timings</h2><table><thead><tr><th>stage</th><th class="num">time</th>'
        f'<th class="num">share</th><th></th></tr></thead><tbody>{"".join(rows)}</tbody></table></section>'
    )


def _footer(report: Mapping[str, Any]) -> str:
    artifacts = _list(report.get("artifacts"))
    files = ", ".join(f"<code>{_esc(a)}</code>" for a in artifacts)
    return (
        f"<footer>{'Artifacts: ' + files + '. ' if files else ''}Generated by clipguard "
        f"{_esc(report.get('clipguard_version') or '')}; the machine-readable record is "
        "<code>report.json</code>.</footer>"
    )


# --------------------------------------------------------------------------- API


def render_html(report: dict, activations: dict[str, dict] | None = None) -> str:
    """Self-contained HTML (inline CSS, plots as base64 PNG ``<img>``, no external URLs or JS).

    ``report`` is the dict ``purify()`` writes as ``report.json``; ``activations`` maps a site
    name to ``{"values": 1-D array of sampled training activations, "bound": 1-D array of that
    site's per-node bounds}`` for the sites worth a histogram. One PNG per plot present:
    before/after bars, evaluation λ sweep, selection evidence, clip fractions, histograms.
    """
    report = report if isinstance(report, Mapping) else {}
    arch = _dict(_dict(report.get("inputs")).get("model")).get("arch") or "model"
    body = "".join(
        (
            _header(report),
            _verdict(report),
            _evaluation(report),
            _reactivation(report),
            _poison(report),
            _lambda(report),
            _sites(report),
            _histograms(report, activations),
            _per_class(report),
            _detection(report),
            _export(report),
            _timings(report),
            _footer(report),
        )
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>clipguard report: {_esc(arch)}</title><style>{CSS}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    )


def write_html(report: dict, path: str | os.PathLike, activations: dict[str, dict] | None = None) -> None:
    """Render and write ``report.html`` atomically: readers see the old file or the new one, never half."""
    write_text(path, render_html(report, activations))
