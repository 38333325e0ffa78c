"""The cost table of the scale runs (issue 29): each stage's wall time and peak memory against
the number of facts and edits, from ``outputs/scale-*/costs.json`` (written by ``locedit run``).

    python scripts/scale_costs.py --output docs/scale-run/costs.md

Growth is the log-log slope of a stage's seconds between the smallest and the largest run
(1 = linear in the number of facts; stages that do not depend on the facts are near 0).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from locedit.pipeline.costs import read_costs, stage_total  # noqa: E402

STAGES = ("prepare", "filter", "stats", "trace", "edit", "analyze")
#: Slope above which a stage is called superlinear (noise in small stages stays below it).
SUPERLINEAR = 1.15


def run_sizes(root: Path) -> list[dict]:
    """One dict per ``scale-*`` folder with a costs file: facts, edits, per-stage totals."""
    runs = []
    for folder in sorted(root.glob("scale-*")):
        costs = read_costs(folder)
        if not costs:
            continue
        facts = _json(folder / "filter" / "report.json").get("kept")
        edits = _json(folder / "edit" / "summary.json").get("edits")
        # a scale folder holds one run: every invocation counts (a resume's cached reruns too)
        stages = {s: stage_total(costs[s], latest_run=False) for s in STAGES if costs.get(s)}
        runs.append({"folder": folder.name, "facts": facts, "edits": edits, "stages": stages,
                     "reused": reused(folder, stages)})
    return sorted(runs, key=lambda r: r["facts"] or 0)


def reused(folder: Path, stages: dict) -> set[str]:
    """Stages that computed nothing in a single invocation: their results came from another
    run's caches (``make scale REUSE=...``), so their seconds are the cost of reading them."""
    trace = _json(folder / "trace" / "summary.json")
    edit = _json(folder / "edit" / "summary.json")
    found = set()
    if trace.get("n_computed") == 0 and len(stages.get("trace", {}).get("pieces", [])) == 1:
        found.add("trace")
    if edit.get("ran_now") == 0 and len(stages.get("edit", {}).get("pieces", [])) == 1:
        found.add("edit")
    return found


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def slope(runs: list[dict], stage: str) -> float:
    """Log-log slope of the stage's seconds until it first finished against facts, smallest to
    largest run that computed the stage (not one that read another run's caches)."""
    have = [r for r in runs if stage in r["stages"] and r["facts"] and stage not in r["reused"]]
    if len(have) < 2:
        return float("nan")
    a, b = have[0], have[-1]
    sa, sb = a["stages"][stage]["to_completion"], b["stages"][stage]["to_completion"]
    if sa <= 0 or sb <= 0 or a["facts"] == b["facts"]:
        return float("nan")
    return math.log(sb / sa) / math.log(b["facts"] / a["facts"])


def _cell(cost: dict, reused: bool) -> str:
    """Seconds until the stage finished (its pieces when it was killed and resumed), peak
    memory, and what a resume spent running it again."""
    pieces, done, n_done = cost["pieces"], cost["to_completion"], cost["pieces_to_completion"]
    text = f"{done:.0f} s"
    if n_done > 1:
        text += f" ({' + '.join(f'{p:.0f}' for p in pieces[:n_done])})"
    pss = cost["peak_tree_pss_mib"]
    rss = max(cost["peak_rss_mib"], cost["peak_rss_child_mib"])
    text += f", {pss / 1024:.1f} GiB" if pss else f", {rss / 1024:.1f} GiB RSS*"
    again = sum(pieces[n_done:])
    if len(pieces) > n_done:
        text += f"; rerun on resume {again:.0f} s"
    if reused:
        text += " (read from a larger run's caches)"
    return text


def table(runs: list[dict]) -> str:
    head = ["stage"] + [f"{r['facts']} facts / {r['edits']} edits" for r in runs] + ["growth"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for stage in STAGES:
        cells = [
            _cell(r["stages"][stage], stage in r["reused"]) if stage in r["stages"] else "–"
            for r in runs
        ]
        growth = slope(runs, stage)
        cells.append("n/a" if math.isnan(growth) else f"{growth:.2f}")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    totals = [sum(c["to_completion"] for c in r["stages"].values()) for r in runs]
    lines.append("| **all** | " + " | ".join(f"**{t / 60:.1f} min**" for t in totals) + " | |")
    if any("RSS*" in line for line in lines):
        lines.append("")
        lines.append("\\* recorded before the PSS sampler existed: the largest single process's "
                     "peak RSS (the stage's or one worker's), not the sum.")
    return "\n".join(lines)


def findings(runs: list[dict]) -> list[str]:
    out = []
    for stage in STAGES:
        growth = slope(runs, stage)
        if not math.isnan(growth) and growth > SUPERLINEAR:
            out.append(f"- {stage} grows faster than linearly (slope {growth:.2f}).")
    if not out:
        out.append(
            f"- No stage grows faster than linearly (every slope is at most {SUPERLINEAR})."
        )
    return out


def figure(runs: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for stage in STAGES:
        have = [r for r in runs if stage in r["stages"] and stage not in r["reused"]]
        if have:
            seconds = [r["stages"][stage]["to_completion"] for r in have]
            ax.plot([r["facts"] for r in have], seconds, marker="o", label=stage)
    facts = [r["facts"] for r in runs]
    ax.set(xscale="log", yscale="log", xlabel="known facts", ylabel="wall time (s)",
           title="Stage wall time against facts (2 CPU cores)")
    ax.set_xticks(facts, [str(f) for f in facts])
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", type=Path, default=Path("outputs"))
    parser.add_argument("--output", type=Path, default=Path("docs/scale-run/costs.md"))
    args = parser.parse_args()
    runs = run_sizes(args.outputs)
    if not runs:
        raise SystemExit(f"no scale runs with a costs.json under {args.outputs}: run `make scale`")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    plot = args.output.with_suffix(".png")
    figure(runs, plot)
    text = "\n".join([
        "# Cost of the scale run by size",
        "",
        "Each stage's wall time until it first finished (the pieces in brackets when it was "
        "killed and resumed; what the resumed pipeline then spent running a finished stage "
        "again, mostly from its caches, is listed apart) and peak "
        "memory (the largest summed PSS of the stage's process and its workers, sampled each "
        "second: what the run takes from the machine), from "
        "`outputs/scale-*/costs.json`; growth is the log-log slope of the seconds against the "
        "facts between the smallest and the largest run (1 = linear). Written by "
        "`make scale-costs`.",
        "",
        table(runs),
        "",
        *findings(runs),
        "",
        f"![stage wall time against facts]({plot.name})",
        "",
    ])
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output} and {plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
