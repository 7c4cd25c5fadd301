"""report.html for `edgeprune build`: the accuracy-latency plot of the pools with the chosen point, and the facts."""

from __future__ import annotations

import html
import json
from pathlib import Path


def plot(path: Path, report: dict, pools: list[tuple[float, float]]) -> None:
    """PNG: each pool subnet at its predicted latency on the target and its validation accuracy; the choice."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    if pools:
        ax.scatter([p[0] for p in pools], [p[1] for p in pools], s=14, c="#9aa5b1", label="pool subnets (predicted)")
    lat = report["latency"]
    x = lat["measured_ms"] if lat["measured_ms"] is not None else lat["predicted_ms"]
    ax.scatter([x], [report["accuracy"]["val"]], s=60, c="#d64545", marker="*", zorder=3,
               label=f"chosen ({lat['used']})")
    ax.scatter([report["accuracy"]["unpruned_ms"]] if report["accuracy"].get("unpruned_ms") else [],
               [report["accuracy"]["unpruned_val"]] if report["accuracy"].get("unpruned_ms") else [], s=30, c="#3b6fb6",
               marker="s", label="unpruned supernet (predicted)")
    ax.axvline(report["budget_ms"], color="#333", linestyle="--", linewidth=1, label="budget")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # log-scale minor labels collide
    ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xlabel(f"latency on {report['target']} (ms)")
    ax.set_ylabel("validation accuracy")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_html(directory: Path, report: dict, pools: list[tuple[float, float]]) -> None:
    plot(directory / "pools.png", report, pools)
    lat, acc = report["latency"], report["accuracy"]
    rows = [
        ("target", report["target"]),
        ("device", report["device"] or "none: the latency is predicted, not measured"),
        ("budget", f"{report['budget_ms']:g} ms ({report['statistic']})"),
        ("met", "yes" if report["met"] else "NO"),
        ("measured latency", "not measured" if lat["measured_ms"] is None else f"{lat['measured_ms']:.3f} ms"),
        ("predicted latency", f"{lat['predicted_ms']:.3f} ms from {lat['predicted_source']}"),
        ("test accuracy", f"{acc['test']:.1%} (unpruned supernet: {acc['unpruned_test']:.1%})"),
        ("MACs", f"{report['macs'] / 1e6:.2f} M"),
        ("parameters", f"{report['parameters'] / 1e6:.3f} M"),
        ("stage times", ", ".join(f"{k} {v:.1f} s" for k, v in report["stage_seconds"].items())),
    ]
    table = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    arch = html.escape(json.dumps(report["architecture"], indent=1))
    (directory / "report.html").write_text(f"""<!doctype html>
<html><head><meta charset="utf-8"><title>edgeprune build: {html.escape(report['target'])}</title>
<style>body{{font-family:sans-serif;max-width:52em;margin:2em auto}}th{{text-align:left;padding-right:1em}}
pre{{background:#f4f4f4;padding:1em}}</style></head><body>
<h1>edgeprune build for {html.escape(report['target'])}</h1>
<table>{table}</table>
<h2>Accuracy and latency</h2><img src="pools.png" alt="pool subnets and the chosen subnet">
<h2>Architecture</h2><pre>{arch}</pre>
</body></html>
""")
