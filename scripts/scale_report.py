"""The index of the committed scale-run report (issue 29): docs/scale-run/README.md, written
from the run's own files (reports/scale-N, outputs/scale-N), so no figure in it is typed by hand.

    python scripts/scale_report.py --facts 100      # after make scale and make scale-docs

The headline is the main variant's rewrite-score regressions (causal tracing, MLP, window 5,
max over tokens; paper Sec. 4-5) beside the paper's GPT-J figures
(:data:`locedit.analysis.claims.PAPER_ROME_LAYER_R2`, ``PAPER_MAX_ADDED_R2``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import pandas as pd

from locedit.analysis.claims import PAPER_MAX_ADDED_R2, PAPER_ROME_LAYER_R2
from locedit.pipeline.costs import read_costs, stage_total

LABELS = {"rome": "ROME (1 layer)", "memit": "MEMIT (5 layers)", "ft1": "FT (1 layer)",
          "ft5": "FT (5 layers)"}


def _interval(row: pd.Series, name: str) -> str:
    lo, hi = row.get(f"{name}_lo"), row.get(f"{name}_hi")
    return "" if pd.isna(lo) or pd.isna(hi) else f" [{lo:.3f}, {hi:.3f}]"


def headline(regressions: pd.DataFrame) -> str:
    """One row per (problem, method): layer R², trace R², added R² with their intervals."""
    main = regressions[(regressions["variant"] == "main")
                       & (regressions["metric"] == "rewrite_score")]
    lines = [
        "| Problem | Method | n edits / facts | Layer R² [95% CI] | Trace R² | Added by tracing "
        "[95% CI] | F-test p | Mixed-model LR p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for _, row in main.iterrows():
        lines.append(
            f"| {row['problem'].replace('_', ' ').title()} | {LABELS.get(row['method'], row['method'])} "
            f"| {int(row['n'])} / {int(row['n_facts'])} "
            f"| {row['r2_layer']:.3f}{_interval(row, 'r2_layer')} | {row['r2_trace']:.3f} "
            f"| {row['added_r2']:.3f}{_interval(row, 'added_r2')} | {row['f_pvalue']:.3g} "
            f"| {row.get('mixed_lr_pvalue', float('nan')):.3g} |"
        )
    lines.append(
        f"| *paper, GPT-J* | ROME (1 layer) | | {PAPER_ROME_LAYER_R2:.3f} | | "
        f"at most {PAPER_MAX_ADDED_R2:.3f} (any method, problem) | | |"
    )
    return "\n".join(lines)


def splice(text: str, name: str, block: str) -> str:
    """``text`` with what stands between ``<!-- name -->`` and ``<!-- /name -->`` replaced by
    ``block`` (the README's generated parts); the markers must be there."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    if start not in text or end not in text:
        raise SystemExit(f"README has no {start} ... {end} block")
    head, _, rest = text.partition(start)
    _, _, tail = rest.partition(end)
    return f"{head}{start}\n{block.strip()}\n{end}{tail}"


def cost_table(costs_md: Path) -> str:
    """The table and findings of costs.md (``make scale-costs``), without its heading."""
    lines = costs_md.read_text().splitlines()
    table = [line for line in lines if line.startswith("|")]
    notes = [line for line in lines if line.startswith(("- ", "\\*"))]
    return "\n".join([*table, "", *notes])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=100)
    parser.add_argument("--output", type=Path, default=Path("docs/scale-run/README.md"))
    parser.add_argument("--code", default=None,
                        help="the commit whose code ran (default: the last commit of src/)")
    parser.add_argument("--readme", type=Path, default=None,
                        help="also rewrite this file's scale-run:headline and scale-run:costs blocks")
    args = parser.parse_args()
    reports, outputs = Path(f"reports/scale-{args.facts}"), Path(f"outputs/scale-{args.facts}")
    regressions = pd.read_csv(reports / "tables" / "regressions.csv")
    filtered = json.loads((outputs / "filter" / "report.json").read_text())
    edits = json.loads((outputs / "edit" / "summary.json").read_text())
    rows = pd.read_parquet(outputs / "edit" / "results.parquet", columns=["method", "problem", "layer"])
    methods = " and ".join(LABELS.get(m, m) for m in sorted(rows["method"].unique()))
    problems = " and ".join(p.replace("_", " ").title() for p in sorted(rows["problem"].unique()))
    layers = ", ".join(str(x) for x in sorted(rows["layer"].unique()))
    costs = {s: stage_total(e, latest_run=False) for s, e in read_costs(outputs).items()}
    total = sum(c["seconds"] for c in costs.values())
    edit_pieces = len(costs.get("edit", {}).get("pieces", []))
    statuses = ", ".join(
        f"{key.removeprefix('status_')} {value}" for key, value in edits.items()
        if key.startswith("status_")
    )
    pieces = (
        f", the edit stage in {edit_pieces} pieces (killed and resumed; see costs.md)"
        if edit_pieces > 1 else ""
    )
    commit = args.code or subprocess.run(
        ["git", "log", "-1", "--format=%h %cs", "--", "src"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()
    text = "\n".join([
        f"# The experiment on {filtered['kept']} known facts of Gemma-3-270M (issue 29)",
        "",
        f"`make scale` (`conf/experiment/scale.yaml`; the code of {commit or 'this commit'}): "
        f"the first {filtered['kept']} CounterFact facts the bundled Gemma-3-270M knows with "
        f"p(o_true) >= 0.02 ({filtered['scanned']} records scanned, {filtered['known']} known), "
        f"MLP causal tracing with window 5 and representation zeroing, {methods} on {problems} "
        f"at layers {layers}: {edits['edits']} edits ({statuses}). Wall time on 2 CPU "
        f"cores: {total / 3600:.1f} h over all stages{pieces}.",
        "",
        "## Headline: R² of rewrite score (the paper's Table 3 question)",
        "",
        headline(regressions),
        "",
        "Intervals: 1000 bootstrap resamples of facts (all layers of a drawn fact together). "
        "The mixed model adds a random intercept per fact (beyond the paper). The full wording, "
        "with every variant and the random-location baseline, is in [summary.md](summary.md).",
        "",
        "## Files",
        "",
        "- [summary.md](summary.md), [tables.md](tables.md): the analysis stage's report "
        "([Table 1](tables/table1.md), [Table 2](tables/table2.md), [Table 3](tables/table3.md), "
        "[random-location baseline](tables/random_baseline.md)).",
        "- Figures: [R² by edit layer and tracing effect](figures/fig06_r2_layer_vs_trace.png), "
        "[edit success by layer](figures/fig07_edit_success_by_layer.png), "
        "[random-location baseline](figures/random_baseline.png), and the rest in "
        "[figures/](figures/).",
        "- [costs.md](costs.md): every stage's wall time and peak memory at 5, 25 and 100 facts.",
        "",
    ])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    if args.readme is not None:
        readme = args.readme.read_text()
        readme = splice(readme, "scale-run:headline", headline(regressions))
        readme = splice(readme, "scale-run:costs", cost_table(args.output.parent / "costs.md"))
        args.readme.write_text(readme, encoding="utf-8")
        print(f"updated the scale-run blocks of {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
