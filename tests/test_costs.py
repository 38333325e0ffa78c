"""Stage costs (issue 29): every `locedit run` invocation records its wall time and peak
memory, a resumed stage's pieces add up, and the scale cost table reads them."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
from e2e_support import ROOT

from locedit.editing.layers import sweep_layers
from locedit.pipeline.common import compose_params
from locedit.pipeline.costs import TreeMemory, measured, read_costs, stage_total


def test_measured_records_ok_failed_and_interrupted(tmp_path):
    with measured(tmp_path, "edit"):
        pass
    with pytest.raises(RuntimeError), measured(tmp_path, "edit"):
        raise RuntimeError("boom")
    with pytest.raises(KeyboardInterrupt), measured(tmp_path, "edit"):
        raise KeyboardInterrupt
    entries = read_costs(tmp_path)["edit"]
    assert [e["status"] for e in entries] == ["ok", "failed", "interrupted"]
    for entry in entries:
        assert entry["seconds"] >= 0
        assert entry["peak_rss_mib"] > 10  # a Python process with torch imported
        assert entry["peak_tree_pss_mib"] > 10


def test_stage_total_sums_the_latest_runs_pieces_only():
    entries = [
        {"status": "ok", "seconds": 100.0, "peak_tree_pss_mib": 900.0},  # an earlier run
        {"status": "interrupted", "seconds": 7.0, "peak_tree_pss_mib": 500.0},
        {"status": "failed", "seconds": 3.0, "peak_tree_pss_mib": 200.0},
        {"status": "ok", "seconds": 11.0, "peak_tree_pss_mib": 300.0},
    ]
    total = stage_total(entries)
    assert total["pieces"] == [7.0, 3.0, 11.0] and total["to_completion"] == pytest.approx(21.0)
    everything = stage_total(entries, latest_run=False)
    assert everything["to_completion"] == pytest.approx(100.0)  # the earlier run finished first
    assert everything["pieces_to_completion"] == 1
    assert stage_total(entries, latest_run=False)["seconds"] == pytest.approx(121.0)
    assert total["seconds"] == pytest.approx(21.0)
    assert total["peak_tree_pss_mib"] == 500.0
    assert len(total["pieces"]) == 3
    # while a run is in progress (no final ok yet) its pieces so far are the latest run
    assert stage_total(entries[:3])["seconds"] == pytest.approx(10.0)
    assert stage_total(entries[:1])["seconds"] == pytest.approx(100.0)


def test_tree_memory_counts_child_processes():
    code = "import time; x = bytearray(200 * 2**20); x[::4096] = b'1' * len(x[::4096]); time.sleep(3)"
    with TreeMemory(interval=0.2) as memory:
        alone = memory.sample()
        child = subprocess.Popen([sys.executable, "-c", code])
        child.wait()
    assert memory.peak_mib > alone + 150


def test_cli_records_each_stage_invocation(tmp_path):
    from omegaconf import OmegaConf

    from locedit.cli import main

    cfg = compose_params(str(ROOT / "conf"), [
        f"paths.outputs={tmp_path / 'out'}", f"paths.reports={tmp_path / 'rep'}",
        f"data.root={tmp_path / 'no-data'}",
    ])
    params = tmp_path / "params.yaml"
    params.write_text(OmegaConf.to_yaml(cfg))
    # the data folder is missing: prepare fails with one line, and its piece is recorded
    assert main(["run", "prepare", "--params", str(params)]) == 2
    entries = read_costs(tmp_path / "out")["prepare"]
    assert [e["status"] for e in entries] == ["failed"]


def test_scale_config_is_the_issues_size():
    cfg = compose_params(str(ROOT / "conf"), ["experiment=scale"])
    assert cfg.data.max_facts >= 100
    assert list(cfg.edit.methods) == ["rome", "ft1"]
    assert list(cfg.edit.problems) == ["error_injection"]
    assert len(sweep_layers(cfg.edit, 18)) >= 6  # Gemma-3-270M has 18 layers
    assert list(cfg.trace.windows) == [5] and cfg.trace.zeroing


def _scale_costs_module():
    spec = importlib.util.spec_from_file_location("scale_costs", ROOT / "scripts" / "scale_costs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_scale_cost_table_slopes(tmp_path):
    scale_costs = _scale_costs_module()
    for facts, edit_seconds, analyze_seconds in ((5, 50.0, 2.0), (20, 200.0, 32.0)):
        folder = tmp_path / f"scale-{facts}"
        (folder / "filter").mkdir(parents=True)
        (folder / "edit").mkdir()
        (folder / "filter" / "report.json").write_text(json.dumps({"kept": facts}))
        (folder / "edit" / "summary.json").write_text(json.dumps({"edits": 12 * facts}))
        costs = {
            "stats": [{"status": "ok", "seconds": 60.0, "peak_tree_pss_mib": 2048.0}],
            "edit": [
                {"status": "interrupted", "seconds": edit_seconds / 2, "peak_tree_pss_mib": 4096.0},
                {"status": "ok", "seconds": edit_seconds / 2, "peak_tree_pss_mib": 3072.0},
            ],
            "analyze": [{"status": "ok", "seconds": analyze_seconds, "peak_tree_pss_mib": 1024.0}],
        }
        (folder / "costs.json").write_text(json.dumps(costs))
    runs = scale_costs.run_sizes(tmp_path)
    assert [r["facts"] for r in runs] == [5, 20]
    assert scale_costs.slope(runs, "edit") == pytest.approx(1.0)
    assert scale_costs.slope(runs, "stats") == pytest.approx(0.0)
    assert scale_costs.slope(runs, "analyze") == pytest.approx(2.0)
    text = scale_costs.table(runs)
    assert "| edit | 50 s (25 + 25), 4.0 GiB | 200 s (100 + 100), 4.0 GiB | 1.00 |" in text
    assert scale_costs.findings(runs) == ["- analyze grows faster than linearly (slope 2.00)."]


def test_a_running_invocation_is_on_file_and_kept_up_to_date(tmp_path):
    """What a kill without cleanup (SIGKILL) leaves: the running entry, updated each beat."""
    import time

    with measured(tmp_path, "trace", heartbeat=0.2):
        first = read_costs(tmp_path)["trace"]
        time.sleep(1.5)
        later = read_costs(tmp_path)["trace"]
    assert [e["status"] for e in first] == ["running"] and first[0]["seconds"] < 0.5
    assert [e["status"] for e in later] == ["running"] and later[0]["seconds"] >= 0.8
    done = read_costs(tmp_path)["trace"]
    assert [e["status"] for e in done] == ["ok"] and done[0]["seconds"] >= 1.5
    # a killed piece before a finished one counts towards the stage's latest run
    killed = [{"status": "running", "seconds": 40.0}, {"status": "ok", "seconds": 2.0}]
    assert stage_total(killed)["seconds"] == pytest.approx(42.0)


def _record_many(outputs: str, stage: str, n: int) -> None:
    from locedit.pipeline.costs import record_cost

    for i in range(n):
        record_cost(outputs, stage, {"status": "ok", "seconds": i})


def test_stages_recording_at_once_lose_no_entry(tmp_path):
    """Two processes appending to one costs.json at the same time (a tune beside an edit
    stage): every entry of both is kept."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_record_many, args=(str(tmp_path), stage, 300))
               for stage in ("edit", "tune")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    costs = read_costs(tmp_path)
    assert len(costs["edit"]) == 300 and len(costs["tune"]) == 300
