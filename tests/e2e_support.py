"""Helpers for end-to-end tests: a small data root and shrunk stage sizes on a tiny model."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from omegaconf import DictConfig

from locedit.pipeline import STAGES
from locedit.pipeline.common import compose_params
from locedit.testing import save_tiny

ROOT = Path(__file__).resolve().parents[1]
ORDER = ["prepare", "filter", "stats", "trace", "tune", "edit", "analyze"]

SUBJECTS = [
    ("Danielle Darrieux", "The mother tongue of Danielle Darrieux is", "French", "English"),
    ("Edwin of Northumbria", "The official religion of Edwin of Northumbria is", "Christianity", "Islam"),
    ("Toko Yasuda", "Toko Yasuda, the", "guitar", "piano"),
    ("Autonomous University of Madrid", "Autonomous University of Madrid, which is located in", "Spain", "Sweden"),
]


def write_data_root(root: Path) -> Path:
    """CounterFact (EasyEdit format), known facts and zsRE, a few records each."""
    cf = [
        {
            "case_id": i, "prompt": prompt, "subject": subject, "target_new": new,
            "ground_truth": true, "rephrase_prompt": f"In short, {prompt}",
            "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": true,
        }
        for i, (subject, prompt, true, new) in enumerate(SUBJECTS)
    ]
    (root / "counterfact_easyedit").mkdir(parents=True, exist_ok=True)
    (root / "counterfact_easyedit" / "counterfact-edit.json").write_text(json.dumps(cf))
    known = [
        {"known_id": i, "subject": s, "attribute": t, "template": p.replace(s, "{}"),
         "prediction": "", "prompt": p, "relation_id": "P1"}
        for i, (s, p, t, _) in enumerate(SUBJECTS)
    ]
    (root / "known_1000.json").write_text(json.dumps(known))
    zsre = [
        {"subject": s, "src": f"What is {s} known for?", "pred": t, "rephrase": f"What made {s} famous?",
         "alt": n, "answers": [t], "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare", "cond": ""}
        for s, _, t, n in SUBJECTS
    ]
    (root / "zsre_easyedit_portability").mkdir(parents=True, exist_ok=True)
    (root / "zsre_easyedit_portability" / "zsre_mend_eval_portability_gpt4.json").write_text(json.dumps(zsre))
    return root


def tiny_overrides(tmp: Path, model_dir: Path, data_root: Path) -> list[str]:
    """Shrink every stage so a whole experiment runs in seconds on a tiny model."""
    return [
        f"model.name={model_dir}",
        f"data.root={data_root}",
        "data.n_records=3", "data.max_facts=2",
        "data.filter.require_known=false", "data.filter.min_p_true=null", "data.filter.max_new_tokens=3",
        f"paths.outputs={tmp / 'outputs'}", f"paths.reports={tmp / 'reports'}",
        f"mlflow.tracking_uri=sqlite:///{tmp / 'mlruns' / 'mlflow.db'}",
        "trace.noise_samples=2",
        "stats.n_samples=4", "stats.sample_length=8",
        "edit.layers=[1,2]", "edit.threads=1",
        "edit.essence.n_samples=2", "edit.essence.max_new_tokens=3",
        "method.rome.v_steps=2", "method.rome.n_context_templates=1",
        "method.memit.v_steps=2", "method.memit.n_context_templates=1",
        "method.ft.steps=2",
        "tune.n_facts=1",
        "analysis.bootstrap_samples=5", "analysis.drop_low_denominator=false",
    ]


def tiny_params(tmp: Path, experiment: str, extra: list[str] = ()) -> DictConfig:
    model_dir = save_tiny(tmp / "tiny-model", "gpt2", n_layers=4)
    data_root = write_data_root(tmp / "data")
    return compose_params(ROOT / "conf", [f"experiment={experiment}", *tiny_overrides(tmp, model_dir, data_root), *extra])


def run_all(params: DictConfig) -> None:
    for stage in ORDER:
        importlib.import_module(STAGES[stage]).run(params)
