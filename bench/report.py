"""Turns pytest-benchmark's JSON into ``bench/results/<name>.md`` and a scaling plot.

    python -m pytest bench/ --benchmark-json=bench/results/cpu.json
    python -m bench.report bench/results/cpu.json            # -> bench/results/cpu.md, cpu_scaling.png

The Markdown page has the machine (CPU model, cores, torch version and threads, date), one table
per benchmark group (mean and median ms, rounds, peak extra MB, and ratios of time and memory to
the NLSN-style baseline of the same case, or to ``reference`` in groups without it), and the cases
that were skipped with their reasons. The PNG plots time and peak extra memory against pixel
count, log-log, for the ``scaling-fwd`` group.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

__all__ = [
    "GROUP_ORDER",
    "load_results",
    "render_markdown",
    "render_summary",
    "plot_scaling",
    "write_report",
    "main",
]

GROUP_ORDER = ("core-fwd", "core-fwdbwd", "scaling-fwd", "gla-fwd", "model-fwd", "network", "network-nlsn")
GROUP_TITLES = {
    "core-fwd": "Attention core, forward (training shape)",
    "core-fwdbwd": "Attention core, forward + backward (training shape)",
    "scaling-fwd": "Attention core, inference scaling (one image)",
    "gla-fwd": "One GLA block with its convolutions, forward",
    "model-fwd": "Whole DLSN network, forward",
    "network": "Whole DLSN network vs the same network with DLSN-style attention",
    "network-nlsn": "Whole NLSN network vs the same network with NLSN-style attention",
}
SCALING_GROUP = "scaling-fwd"
# The first one a group has is its base; the whole-network groups have only dlsn-style or nlsn-style.
RATIO_BASELINES = ("nlsn-style", "reference", "dlsn-style")


def _impl_rank(impl: str) -> tuple[int, str]:
    order = {"reference": 1, "dlsn-style": 2, "nlsn-style": 3}
    return (0 if impl.startswith(("fused-", "nlsa-")) else order.get(impl, 4), impl)


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    with open(path) as handle:
        data = json.load(handle)
    if "benchmarks" not in data:
        raise ValueError(f"{path} is not a pytest-benchmark JSON file (no 'benchmarks' key)")
    return data


def _row(bench: dict[str, Any]) -> dict[str, Any]:
    info = bench.get("extra_info", {})
    stats = bench["stats"]
    return {
        "group": bench.get("group") or "ungrouped",
        "impl": info.get("impl", bench["name"]),
        "case": info.get("case", bench["name"]),
        "pixels": info.get("pixels"),
        "mean_ms": stats["mean"] * 1e3,
        "median_ms": stats["median"] * 1e3,
        "rounds": stats.get("rounds"),
        "peak_mb": info.get("peak_extra_mb"),
        "estimate_mb": info.get("estimate_mb"),
    }


def rows_by_group(data: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for bench in data["benchmarks"]:
        row = _row(bench)
        groups[row["group"]].append(row)
    for rows in groups.values():
        rows.sort(key=lambda r: (r["pixels"] or 0, r["case"], _impl_rank(r["impl"])))
    ordered = [g for g in GROUP_ORDER if g in groups] + sorted(g for g in groups if g not in GROUP_ORDER)
    return {g: groups[g] for g in ordered}


def _machine(data: dict[str, Any]) -> dict[str, Any]:
    """Machine facts from the JSON (our conftest's entry, else pytest-benchmark's own)."""
    info = dict(data.get("machine_info", {}).get("dlsn_bench", {}))
    cpu = data.get("machine_info", {}).get("cpu", {})
    info.setdefault("cpu_model", cpu.get("brand_raw", "unknown"))
    info.setdefault("cores", cpu.get("count", "?"))
    info.setdefault("torch_version", "?")
    info.setdefault("torch_threads", "?")
    info.setdefault("device", "cpu")
    info.setdefault("date", data.get("datetime", "?"))
    return info


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _ratio(value: float | None, base: float | None) -> str:
    if value is None or base is None or base <= 0:
        return "-"
    return f"{value / base:.3g}x"


def render_markdown(data: dict[str, Any], scaling_png: str | None = None) -> str:
    machine = _machine(data)
    mode = "full"
    if machine.get("quick"):
        mode = "quick (one round at small sizes: proves the benchmarks run, not a measurement)"
    lines = [
        f"# Benchmarks on {machine['device']}",
        "",
        f"- machine: {machine['cpu_model']}, {machine['cores']} cores"
        + (f"; GPU {machine['device_name']}" if machine.get("device_name") else ""),
        f"- torch {machine['torch_version']}, {machine['torch_threads']} threads",
        f"- date: {machine['date']}",
        f"- mode: {mode}",
        "- method: bench/NOTES.md. Times are wall clock per call; peak extra memory is measured in a",
        "  child process (CPU: VmHWM above the resident baseline; CUDA: max_memory_allocated above",
        "  the allocated baseline). Ratios are this row / the baseline row of the same case (< 1: less).",
        "",
    ]
    for group, rows in rows_by_group(data).items():
        impls = {r["impl"] for r in rows}
        baseline = next((b for b in RATIO_BASELINES if b in impls), None)
        lines += [f"## {group}: {GROUP_TITLES.get(group, group)}", ""]
        header = "| impl | case | mean ms | median ms | rounds | peak extra MB |"
        rule = "|---|---|---:|---:|---:|---:|"
        if baseline is not None:
            header += f" time / {baseline} | memory / {baseline} |"
            rule += "---:|---:|"
        lines += [header, rule]
        base_rows = {r["case"]: r for r in rows if r["impl"] == baseline}
        for r in rows:
            line = (
                f"| {r['impl']} | {r['case']} | {_fmt(r['mean_ms'], 2)} | {_fmt(r['median_ms'], 2)} | "
                f"{r['rounds'] or '-'} | {_fmt(r['peak_mb'])} |"
            )
            if baseline is not None:
                base = base_rows.get(r["case"])
                line += (
                    f" {_ratio(r['mean_ms'], base and base['mean_ms'])} |"
                    f" {_ratio(r['peak_mb'], base and base['peak_mb'])} |"
                )
            lines.append(line)
        if group == SCALING_GROUP and scaling_png:
            lines += ["", f"![time and memory against pixel count]({scaling_png})"]
        lines.append("")
    skipped = data.get("dlsn_skipped") or []
    if skipped:
        lines += ["## Not run", ""]
        lines += [f"- `{s['test']}`: {s['reason']}" for s in skipped]
        lines.append("")
    return "\n".join(lines)


def _times(ratio: float) -> str:
    return f"{ratio:.1f}x" if ratio < 10 else f"{ratio:.0f}x"


def _speed_words(fused_ms: float | None, base_ms: float | None) -> str:
    if not fused_ms or not base_ms:
        return "-"
    ratio = base_ms / fused_ms
    return f"{_times(ratio)} faster" if ratio >= 1 else f"{_times(1 / ratio)} slower"


def _memory_words(fused_mb: float | None, base_mb: float | None) -> str:
    if fused_mb is None or base_mb is None or fused_mb <= 0 or base_mb <= 0:
        return "-"
    ratio = base_mb / fused_mb
    return f"{_times(ratio)} less" if ratio >= 1 else f"{_times(1 / ratio)} more"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "~"


def _not_run_reason(data: dict[str, Any], group: str, case: str, baseline: str) -> str:
    """Why the ``baseline`` row of ``case`` is missing: the run's skip (or left-out case) that names it."""
    skipped = data.get("dlsn_skipped") or []
    for entry in skipped:  # entries that name their group and case (conftest: cases quick mode leaves out)
        if (entry.get("group"), entry.get("case"), entry.get("impl")) == (group, case, baseline):
            return entry["reason"]
    size = case.split()[-1] if case else ""
    for entry in skipped:  # a skipped test: its id names the impl and the size, e.g. [nlsn-style-512x512]
        test = entry.get("test", "")
        if f"[{baseline}" in test and (size in test or group.removeprefix("core-") in test):
            return entry["reason"]
    return "no result in this run"


def render_summary(data: dict[str, Any]) -> list[str]:
    """Terminal lines (at most 120 columns): each fused row against the NLSN-style row of its case.

    Groups without an NLSN-style row (the whole networks) compare with ``reference`` and say so. A
    baseline that was not run (too big for the memory limit, left out in quick mode) shows as "not run"
    with no ratio, and a line under the group says why.
    """
    lines: list[str] = []
    columns = f"  {'case':<32} {'impl':<17}{'fused ms':>10}{'base ms':>10}{'fused MB':>10}{'base MB':>10}"
    columns += f"  {'time':<13}{'peak memory':<11}"
    for group, rows in rows_by_group(data).items():
        fused = [r for r in rows if r["impl"].startswith(("fused-", "nlsa-"))]
        if not fused:
            continue
        impls = {r["impl"] for r in rows}
        baseline = next((b for b in RATIO_BASELINES if b in impls), RATIO_BASELINES[0])
        base_rows = {r["case"]: r for r in rows if r["impl"] == baseline}
        lines += [_clip(f"{group}: {GROUP_TITLES.get(group, group)}; base = {baseline}", 120), columns]
        reasons: dict[str, str] = {}
        for r in fused:
            if r["case"] not in base_rows:
                reasons.setdefault(r["case"], _not_run_reason(data, group, r["case"], baseline))
            base = base_rows.get(r["case"], {})
            base_ms = base.get("median_ms")
            line = (
                f"  {_clip(r['case'], 32):<32} {_clip(r['impl'], 17):<17}{_fmt(r['median_ms'], 2):>10}"
                f"{_fmt(base_ms, 2) if base else 'not run':>10}{_fmt(r['peak_mb']):>10}{_fmt(base.get('peak_mb')):>10}"
                f"  {_speed_words(r['median_ms'], base_ms):<13}{_memory_words(r['peak_mb'], base.get('peak_mb')):<11}"
            )
            lines.append(line.rstrip())
        lines += [_clip(f"  {baseline} {case}: not run, {reason}", 120) for case, reason in reasons.items()]
        lines.append("")
    if lines:
        lines.append(
            "time: median per call against the base; peak memory: peak extra MB against the base "
            "(one child process per case)."
        )
    return lines


def write_report(data: dict[str, Any], out_dir: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Writes ``<name>.md`` and, when the run has a scaling group, ``<name>_scaling.png``; returns the paths."""
    name = name or _machine(data)["device"].split(":")[0]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png_name = f"{name}_scaling.png"
    has_plot = plot_scaling(data, out / png_name)
    (out / f"{name}.md").write_text(render_markdown(data, png_name if has_plot else None))
    return [out / f"{name}.md"] + ([out / png_name] if has_plot else [])


def plot_scaling(data: dict[str, Any], path: str | os.PathLike) -> bool:
    """Log-log time and peak memory against pixels for the scaling group; False if it has no rows."""
    rows = rows_by_group(data).get(SCALING_GROUP, [])
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["pixels"]:
            series[r["impl"]].append(r)
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl in sorted(series, key=_impl_rank):
        points = sorted(series[impl], key=lambda r: r["pixels"])
        px = [r["pixels"] for r in points]
        ax_time.plot(px, [r["mean_ms"] for r in points], marker="o", label=impl)
        mem = [(r["pixels"], r["peak_mb"]) for r in points if r["peak_mb"] and r["peak_mb"] > 0]
        if mem:
            ax_mem.plot([m[0] for m in mem], [m[1] for m in mem], marker="o", label=impl)
    machine = _machine(data)
    for ax, ylabel in ((ax_time, "time per call (ms)"), (ax_mem, "peak extra memory (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("pixels (H x W)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    where = f"{machine['device']} ({machine['cpu_model']}, {machine['torch_threads']} threads)"
    fig.suptitle(f"Inference scaling on {where}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="pytest-benchmark JSON -> Markdown table and scaling plot.")
    parser.add_argument("json", help="file written by pytest --benchmark-json=...")
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--name", default=None, help="output base name (default: the device, e.g. cpu)")
    args = parser.parse_args(argv)

    data = load_results(args.json)
    written = write_report(data, args.out_dir, args.name)
    print("wrote " + " and ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
