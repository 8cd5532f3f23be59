"""Energy reports: rows for CNN / APoT CNN / AdderNet / quantized AdderNet, the text table, accuracy
records matched to rows, the accuracy-vs-energy plot (the paper's Figure 6) and :func:`energy_command`,
what ``adderquant energy`` calls (conventions: ``docs/energy.md``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ._plotting import agg_figure, save_figure
from .counting import count_named
from .energy import PARTS, EnergyTable, energy, resolve_apot_terms, tally, tally_flops

FAMILIES = {  # (kind, method) → family label
    ("conv", "fp32"): "CNN",
    ("conv", "uniform"): "CNN",
    ("conv", "apot"): "CNN (APoT)",
    ("adder", "fp32"): "AdderNet",
    ("adder", "paper"): "AdderNet (quantized)",
    ("adder", "qssf"): "AdderNet (quantized)",
}


def variant_row(name: str, kind: str, method: str, bits: int, *, groups: int = 4,
                first_last_bits: int | None = None, acc_bits: int | str = 32,
                apot_terms: Callable[[int], float] | float | None = None, fold_bn: bool = True,
                table: EnergyTable | None = None) -> dict[str, Any]:
    """One report row: ``kind`` "conv"/"adder", ``method`` "fp32", "uniform" (CNN, per-channel
    weights, per-layer activations), "apot" (CNN), "paper" (adder, ``groups`` scales) or "qssf" (adder,
    one shared scale)."""
    if (kind, method) not in FAMILIES:
        raise ValueError(f"unknown variant ({kind!r}, {method!r}); choose from {sorted(FAMILIES)}")
    counts = count_named(name, kind)
    if method == "fp32":
        bits = 32
    elif bits >= 32:
        raise ValueError(f"method {method!r} needs bits < 32, got {bits}")
    g = groups if method == "paper" else 1
    terms = resolve_apot_terms(apot_terms)(bits) if method == "apot" else None
    fl_bits = first_last_bits if bits < 32 else None  # FP32 rows are FP32 throughout
    t = tally(counts, bits, groups=g, first_last_bits=fl_bits, acc_bits=acc_bits, apot_terms=terms,
              fold_bn=fold_bn)
    e = energy(t, table)
    fmt = "FP32" if bits == 32 else f"int{bits}"
    if method == "fp32":
        label = f"{'CNN' if kind == 'conv' else 'AdderNet'} FP32"
    elif method == "apot":
        label = f"CNN APoT {bits}b ({terms:g} terms)"
    else:
        label = f"CNN {fmt}" if kind == "conv" else f"AdderNet {fmt} g={g}"
    return {"model": name, "label": label, "family": FAMILIES[(kind, method)], "kind": kind,
            "method": method, "bits": bits, "groups": g if kind == "adder" and bits < 32 else None,
            "first_last_bits": fl_bits or 32, "acc_bits": acc_bits if bits < 32 else 32,
            "apot_terms": terms, "macs": counts.macs, "params": counts.params,
            "flops": tally_flops(t), "ops": t["ops"], "memory_bits": t["memory_bits"],
            "pJ": e["pJ"], "parts_uJ": e["parts_uJ"], "compute_uJ": e["compute_uJ"],
            "memory_uJ": e["memory_uJ"], "total_uJ": e["total_uJ"]}


def model_report(name: str, bits_list: Iterable[int] = (32, 8, 6, 5, 4), groups: int = 4,
                 first_last_bits: int | None = None, *, acc_bits: int | str = 32,
                 apot_terms: Callable[[int], float] | float | None = None, include_apot: bool = True,
                 fold_bn: bool = True, table: EnergyTable | None = None) -> list[dict[str, Any]]:
    """Rows for CNN (FP32 at 32, int-b uniform otherwise), APoT CNN (b < 32, if ``include_apot``),
    AdderNet FP32 and quantized AdderNet with ``groups`` scales at each b (APoT rows are skipped at
    widths where the terms function raises ``ValueError``); ``ratio_vs_cnn_fp32`` is the
    total energy relative to the FP32 CNN. ``apot_terms``: terms per weight, a number or a callable of
    the bit width (default: see :func:`resolve_apot_terms`)."""
    bits_list = sorted(set(bits_list), reverse=True)
    kw = dict(groups=groups, first_last_bits=first_last_bits, acc_bits=acc_bits, apot_terms=apot_terms,
              fold_bn=fold_bn, table=table)
    rows = []
    for b in bits_list:
        rows.append(variant_row(name, "conv", "fp32" if b >= 32 else "uniform", b, **kw))
    if include_apot:
        terms_of = resolve_apot_terms(apot_terms)
        for b in (b for b in bits_list if b < 32):
            try:
                terms = terms_of(b)
            except ValueError:  # no APoT level set at this width (the authors' sets cover 2..7 bits)
                continue
            rows.append(variant_row(name, "conv", "apot", b, **{**kw, "apot_terms": terms}))
    for b in bits_list:
        rows.append(variant_row(name, "adder", "fp32" if b >= 32 else "paper", b, **kw))
    _add_ratios(rows, name, kw)
    return rows


def _add_ratios(rows: list[dict[str, Any]], name: str, kw: Mapping[str, Any]) -> None:
    ref = next((r for r in rows if r["kind"] == "conv" and r["method"] == "fp32"), None)
    if ref is None:
        ref = variant_row(name, "conv", "fp32", 32, **kw)
    for r in rows:
        r["ratio_vs_cnn_fp32"] = r["total_uJ"] / ref["total_uJ"]


# -- accuracies ---------------------------------------------------------------------------------------


def load_accuracies(path: str | Path) -> list[dict[str, Any]]:
    """Read accuracy records: a JSON list of objects, one object, ``{"results": [...]}``, or JSON
    lines (one object per line). Each object needs ``kind`` ("adder"/"conv"), ``method``, ``bits`` and
    ``top1``; ``model``, ``dataset`` and ``groups`` are optional. A record without ``kind`` whose
    ``method`` is one of ``adderquant quantize``'s (what ``quantize --save`` wrote before it recorded
    the kind) is an AdderNet's. Bad JSON or a record without the fields: ``ValueError``."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: neither JSON nor JSON lines ({err})") from None
    if isinstance(data, dict):
        data = data["results"] if isinstance(data.get("results"), list) else [data]
    from ..quant.config import METHODS

    records = []
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise ValueError(f"{path}: record {i} is not a JSON object")
        if "kind" not in rec and str(rec.get("method", "")).split(" ")[0] in METHODS:
            rec = {**rec, "kind": "adder"}  # `adderquant quantize --save` (qssf: "qssf (qssf-w)")
        missing = [k for k in ("kind", "method", "bits", "top1") if k not in rec]
        if missing:
            raise ValueError(f"{path}: record {i} lacks {missing} (has {sorted(rec)[:12]})")
        if rec["kind"] not in ("adder", "conv"):
            raise ValueError(f"{path}: record {i}: kind must be 'adder' or 'conv', got {rec['kind']!r}")
        records.append(dict(rec))
    return records


def record_variant(rec: Mapping[str, Any], groups: int = 4) -> tuple[str, str, int, int]:
    """(kind, energy method, bits, groups) of an accuracy record: FP32 if bits ≥ 32 or method "fp32"/
    "fp"; for CNNs "apot" → APoT, any other method → uniform integer; for AdderNets "qssf*" → one
    shared scale, any other method → ``rec["groups"]`` (default ``groups``) group scales."""
    kind, method, bits = rec["kind"], str(rec["method"]).lower(), int(rec["bits"])
    if bits >= 32 or method in ("fp32", "fp", "full"):
        return kind, "fp32", 32, 1
    if kind == "conv":
        return kind, ("apot" if method.startswith("apot") else "uniform"), bits, 1
    if method.startswith("qssf"):
        return kind, "qssf", bits, 1
    return kind, "paper", bits, int(rec.get("groups", groups))


def _row_key(row: Mapping[str, Any]) -> tuple[str, str, int, int]:
    return row["kind"], row["method"], row["bits"], row["groups"] or 1


def attach_accuracies(rows: list[dict[str, Any]], records: Sequence[Mapping[str, Any]], *,
                      groups: int = 4, **variant_kw) -> list[dict[str, Any]]:
    """Points for the plot: one per record (for ``rows``' model), carrying the record's top-1 and the
    energy of the matching row (computed with ``variant_kw`` if ``rows`` lacks it)."""
    name = rows[0]["model"]
    by_key = {_row_key(r): r for r in rows}
    points = []
    for rec in records:
        if rec.get("model", name) != name:
            continue
        kind, method, bits, g = record_variant(rec, groups)
        key = (kind, method, bits, g if kind == "adder" and bits < 32 else 1)
        if key not in by_key:
            by_key[key] = variant_row(name, kind, method, bits, groups=g, **variant_kw)
        row = by_key[key]
        points.append({**{k: row[k] for k in ("label", "family", "kind", "bits", "total_uJ", "compute_uJ")},
                       "method": rec["method"], "energy_method": method, "groups": row["groups"],
                       "top1": float(rec["top1"]), "dataset": rec.get("dataset")})
    return points


def plot_accuracy_vs_energy(rows: Sequence[Mapping[str, Any]],
                            accuracies: Sequence[Mapping[str, Any]] | Mapping[str, float],
                            path: str | Path, *, energy_key: str = "total_uJ", title: str | None = None,
                            log_x: bool = True) -> Path:
    """Accuracy vs energy like the paper's Figure 6, written as a PNG (Agg canvas; matplotlib is
    imported only when plotting). ``accuracies``: accuracy records (see :func:`load_accuracies`) or a mapping
    row label → top-1. One series per family (CNN, CNN APoT, AdderNet FP32, quantized AdderNet per
    method); points annotated with their bit width."""
    rows = list(rows)
    if isinstance(accuracies, Mapping):
        by_label = {r["label"]: r for r in rows}
        unknown = sorted(set(accuracies) - set(by_label))
        if unknown:
            raise ValueError(f"accuracies for unknown row labels {unknown}; labels: {sorted(by_label)}")
        points = [{**by_label[k], "top1": float(v)} for k, v in accuracies.items()]
    else:
        points = attach_accuracies(rows, accuracies)
    if not points:
        raise ValueError("no accuracy matches the rows: nothing to plot")
    datasets = {p.get("dataset") for p in points}
    series: dict[str, list] = {}
    for p in points:
        if p["kind"] == "adder" and p["bits"] < 32:
            name = f"AdderNet quantized ({p['method']}, g={p['groups']})"
        elif p["kind"] == "adder":
            name = "AdderNet FP32"
        else:
            name = p["family"]
        if len(datasets) > 1:
            name += f" — {p.get('dataset')}"
        series.setdefault(name, []).append(p)
    fig = agg_figure(figsize=(7.5, 5.0), dpi=120)
    ax = fig.add_subplot(1, 1, 1)
    markers = "os^Dvp*hX"
    for i, (name, pts) in enumerate(sorted(series.items())):
        pts.sort(key=lambda p: p[energy_key])
        xs, ys = [p[energy_key] for p in pts], [p["top1"] for p in pts]
        ax.plot(xs, ys, marker=markers[i % len(markers)], linestyle="-" if len(pts) > 1 else "none",
                markersize=7, label=name)
        for p in pts:
            ax.annotate("FP32" if p["bits"] >= 32 else f"{p['bits']}b", (p[energy_key], p["top1"]),
                        textcoords="offset points", xytext=(5, 5), fontsize=8)
    if log_x:
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log")
        plain = FuncFormatter(lambda v, _: f"{v:g}")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(plain)
        ax.tick_params(axis="x", which="both", labelsize=8)
    unit = {"total_uJ": "energy per image, compute + memory (µJ)",
            "compute_uJ": "compute energy per image (µJ)"}
    ax.set_xlabel(unit.get(energy_key, energy_key))
    ax.set_ylabel("top-1 accuracy (%)")
    model = rows[0]["model"] if rows else ""
    ax.set_title(title or f"{model}: accuracy vs energy (45 nm op energies)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)


# -- CLI-facing -------------------------------------------------------------------------------------

_COLUMNS = (("label", "variant", "{}"), ("macs", "MACs (M)", "{:.2f}"), ("body", "body µJ", "{:.2f}"),
            ("first_last", "first/last µJ", "{:.2f}"), ("scales", "scales µJ", "{:.3f}"),
            ("aux", "aux µJ", "{:.2f}"), ("compute_uJ", "compute µJ", "{:.2f}"),
            ("memory_uJ", "memory µJ", "{:.2f}"), ("total_uJ", "total µJ", "{:.2f}"),
            ("ratio_vs_cnn_fp32", "× CNN FP32", "{:.3f}"), ("top1", "top-1 %", "{:.2f}"))


def format_table(rows: Sequence[Mapping[str, Any]], markdown: bool = False) -> str:
    """Rows as an aligned text table (or a Markdown table)."""
    cols = [c for c in _COLUMNS if c[0] != "top1" or any("top1" in r for r in rows)]
    body = []
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key, r.get("parts_uJ", {}).get(key, 0.0 if key in PARTS else None))
            if key == "macs":
                v = v / 1e6
            cells.append("–" if v is None else fmt.format(v))
        body.append(cells)
    head = [c[1] for c in cols]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in body])
    widths = [max(len(h), *(len(c[i]) for c in body)) for i, h in enumerate(head)]
    fmt_line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                       for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
    return "\n".join([fmt_line(head), fmt_line(["-" * w for w in widths])] + [fmt_line(c) for c in body])


def energy_command(model: str, bits: Sequence[int] | None = None,
                   plot_path: str | Path | None = None, accuracies_json: str | Path | None = None, *,
                   groups: int = 4, first_last_bits: int | None = None, acc_bits: int | str = 32,
                   apot_terms: Callable[[int], float] | float | None = None,
                   energy_table: str | Path | EnergyTable | None = None) -> tuple[str, dict[str, Any]]:
    """``adderquant energy --model M [--bits 8 6 5 4] [--json] [--plot F.png] [--accuracies F]``.

    FP32 rows are always included; ``bits`` defaults to 8 6 5 4. Returns ``(text, data)``: ``text`` is
    the aligned table, ``data`` a JSON-able dict with the rows,
    the energy table used, the settings, and the accuracy points when ``accuracies_json`` is given.
    ``plot_path`` needs ``accuracies_json``.
    """
    table = (energy_table if isinstance(energy_table, EnergyTable)
             else EnergyTable.from_json(energy_table) if energy_table is not None else EnergyTable())
    bits_list = [32, *(bits if bits is not None else (8, 6, 5, 4))]
    rows = model_report(model, bits_list, groups, first_last_bits, acc_bits=acc_bits, apot_terms=apot_terms,
                        table=table)
    data: dict[str, Any] = {
        "model": model, "settings": {"bits": sorted(set(bits_list), reverse=True), "groups": groups,
                                     "first_last_bits": first_last_bits or 32, "acc_bits": acc_bits,
                                     "fold_bn": True},
        "energy_table": table.to_dict(), "rows": rows}
    if plot_path is not None and accuracies_json is None:
        raise ValueError("--plot needs --accuracies (a results JSON with top-1 per variant)")
    if accuracies_json is not None:
        records = load_accuracies(accuracies_json)
        points = attach_accuracies(rows, records, groups=groups, first_last_bits=first_last_bits,
                                   acc_bits=acc_bits, apot_terms=apot_terms, table=table)
        data["points"] = points
        for r in rows:  # show top-1 in the table where exactly one record matches the row
            hits = [p["top1"] for p in points if p["label"] == r["label"]]
            if len(hits) == 1:
                r["top1"] = hits[0]
        if plot_path is not None:
            data["plot"] = str(plot_accuracy_vs_energy(rows, records, plot_path))
    return format_table(rows), data


__all__ = ["FAMILIES", "attach_accuracies", "energy_command", "format_table", "load_accuracies", "model_report",
           "plot_accuracy_vs_energy", "record_variant", "variant_row"]
