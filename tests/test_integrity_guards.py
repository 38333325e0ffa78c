"""Issue 30, replayed on a tiny model: a record's id never edits another fact or writes outside
the outputs, every module on a row's path is in its key, stale reports say so, no worker
outlives its sweep, and the smaller messages say what to do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from omegaconf import OmegaConf

from locedit import versioning
from locedit.cli import main as cli_main
from locedit.data.loaders import DatasetError, load_counterfact, load_known, load_zsre
from locedit.data.records import FactRecord, RecordError, read_records, write_records
from locedit.pipeline import analyze as analyze_stage
from locedit.pipeline import edit as edit_stage
from locedit.pipeline import stats as stats_stage
from locedit.pipeline import trace as trace_stage
from locedit.pipeline.common import STALE_BANNER, compose_params
from locedit.storage import LockHeld
from locedit.sweep import ResultStore, run_sweep
from locedit.sweep import worker as sweep_worker
from locedit.sweep.plan import method_code_version
from locedit.sweep.runner import pending_jobs
from tests.test_integrity import _changed_source, _one_fact_params, _write_lock
from tests.test_loaders import EASYEDIT_RECORD
from tests.test_sweep import FACTS, make_params


@pytest.fixture(autouse=True)
def _fresh_versions():
    versioning.clear_caches()
    yield
    versioning.clear_caches()


# -- ids -----------------------------------------------------------------------------------------


def test_a_repeated_id_is_refused_at_prepare_naming_both_records(tmp_path):
    folder = tmp_path / "counterfact_easyedit"
    folder.mkdir()
    other = {**EASYEDIT_RECORD, "subject": "Manila", "prompt": "Manila is the capital of"}
    (folder / "counterfact-edit.json").write_text(json.dumps([EASYEDIT_RECORD, other]))
    with pytest.raises(DatasetError) as err:
        load_counterfact(tmp_path)
    message = str(err.value)
    assert "counterfact-edit.json[0]" in message and "counterfact-edit.json[1]" in message
    assert "'cf-3'" in message and "\n" not in message
    # a hand-edited facts file with a repeated id is refused too, not edited as one fact
    path = tmp_path / "facts.jsonl"
    write_records(path, [FACTS[0], FactRecord("f1", "Manila", "Manila is in", "Asia", "Europe")])
    with pytest.raises(ValueError, match=r"'f1' is used by two records, .*facts.jsonl\[0\] and .*\[1\]"):
        read_records(path)


@pytest.mark.parametrize("bad", ["", "   ", "a\x00b", "line\nbreak", "x" * 600])
def test_an_unusable_id_is_a_counted_skip(bad):
    with pytest.raises(RecordError, match="fact id"):
        FactRecord(bad, "Paris", "Paris is in", "France").validate()


ODD_IDS = ["a/b", "a_b", "A_b", "../../../../escape", "/abs/path", "x" * 300, "日本語 id", ".."]


def _odd_records() -> list[FactRecord]:
    base = FACTS[0]
    return [FactRecord(i, base.subject, base.prompt, base.target_true, base.target_new).validate()
            for i in ODD_IDS]


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_ids_never_choose_where_files_are_written(tmp_path):
    """Pre-edit caches (edit) and grids and heatmaps (trace) of records whose ids hold ``/``,
    ``..``, an absolute path, 300 characters or unicode: every file lies directly in its
    stage's folder, one per id (``a/b`` and ``a_b`` do not share one), with the id inside."""
    params = make_params(tmp_path, methods=("ft1",), problems=("error_injection",))
    params = OmegaConf.merge(params, {
        "trace": {"windows": [1], "n_heatmaps": 2, "zeroing": False},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"},
    })
    records = _odd_records()
    write_records(tmp_path / "outputs" / "filter" / "facts.jsonl", records)
    before = _files(tmp_path)
    spec = edit_stage.build_spec(params)
    pre = spec.out_dir / "pre"
    pre.mkdir(parents=True, exist_ok=True)
    model, tokenizer = edit_stage.model_from_params(params)
    for record in records:
        sweep_worker._pre_edit(model, tokenizer, record, ["error_injection"], spec.config, pre, "")
    written = {p.relative_to(pre) for p in _files(pre)}
    assert len(written) == len(ODD_IDS) and all(len(p.parts) == 1 for p in written)
    assert {json.loads((pre / p).read_text())["fact_id"] for p in written} == set(ODD_IDS)

    trace_stage.run(params)
    grids = tmp_path / "outputs" / "trace" / "grids"
    names = {p.relative_to(grids) for p in _files(grids)}
    assert len(names) == len(ODD_IDS) and all(len(p.parts) == 1 for p in names)
    import numpy as np

    assert {str(np.load(grids / p)["fact_id"]) for p in names} == set(ODD_IDS)
    new = _files(tmp_path) - before
    outputs = (tmp_path / "outputs").resolve()
    assert all(p.resolve().is_relative_to(outputs) or "mlruns" in p.parts for p in new)
    assert not (tmp_path.parent / "escape").exists() and not Path("/abs/path").exists()


# -- code versions -------------------------------------------------------------------------------


def test_every_module_on_a_rows_path_is_in_its_key(tmp_path, monkeypatch):
    params = _one_fact_params(tmp_path, methods=("ft1", "ft5"))
    spec = edit_stage.build_spec(params)
    assert run_sweep(spec, progress=False) == 2
    store = ResultStore(spec.out_dir)

    def rerun() -> int:
        tasks = edit_stage.build_spec(params).tasks
        return sum(len(t) for t in pending_jobs(tasks, store.done_keys()).values())

    assert rerun() == 0
    for module in ("locedit.editing.methods", "locedit.editing.editor", "locedit.sweep.worker"):
        monkeypatch.undo()
        _changed_source(monkeypatch, module)
        assert rerun() == 2, module  # every row runs through it
    # a method's own code reruns its rows only; an unrelated module nothing
    monkeypatch.undo()
    versioning.clear_caches()
    before = {m: method_code_version(m) for m in ("rome", "memit", "ft5")}
    _changed_source(monkeypatch, "locedit.editing.vstar")  # ROME's and MEMIT's v*/z*
    after = {m: method_code_version(m) for m in ("rome", "memit", "ft5")}
    assert after["rome"] != before["rome"] and after["memit"] != before["memit"]
    assert after["ft5"] == before["ft5"]
    monkeypatch.undo()
    _changed_source(monkeypatch, "locedit.tracing.plots")
    assert rerun() == 0


# -- stale reports -------------------------------------------------------------------------------


def _old_reports(reports: Path) -> None:
    (reports / "plots").mkdir(parents=True)
    (reports / "summary.md").write_text("# Summary\n\nROME R² 0.42\n")
    (reports / "tables.md").write_text("# Tables\n")
    (reports / "metrics.json").write_text(json.dumps({"edits": 256, "seconds": {"edit": 9.0}}))
    (reports / "plots" / "rewrite_by_layer.csv").write_text("layer,rewrite_score\n0,0.5\n")


def _assert_stale(reports: Path, stage: str) -> None:
    metrics = json.loads((reports / "metrics.json").read_text())
    assert set(metrics) == {"stale", "previous"} and stage in metrics["stale"]
    assert metrics["previous"]["edits"] == 256  # kept, but not as current numbers
    assert (reports / "summary.md").read_text().startswith(STALE_BANNER) if (
        reports / "summary.md").exists() else True
    assert not (reports / "plots" / "rewrite_by_layer.csv").exists()
    assert (reports / "STALE.md").exists()


def test_reports_are_stamped_stale_when_a_stage_starts(tmp_path, monkeypatch):
    params = _one_fact_params(tmp_path, methods=("ft1",))
    params = OmegaConf.merge(params, {"paths": {"reports": str(tmp_path / "reports")}})
    reports = tmp_path / "reports"
    _old_reports(reports)

    def killed(*_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_worker, "_run_task", killed)
    with pytest.raises(KeyboardInterrupt):
        edit_stage.run(params)
    _assert_stale(reports, "edit")
    summary = (reports / "summary.md").read_text()
    assert summary.startswith(STALE_BANNER) and "ROME R² 0.42" in summary
    assert summary.count(STALE_BANNER) == 1
    # a killed analysis leaves them stale too (one banner, the numbers still under previous)
    monkeypatch.setattr(analyze_stage, "analyze", killed)
    (tmp_path / "outputs" / "trace").mkdir(parents=True, exist_ok=True)
    for name in ("trace/effects.parquet", "edit/results.parquet"):
        (tmp_path / "outputs" / name).write_text("")
    monkeypatch.setattr(analyze_stage, "read_effects", lambda _p: None)
    monkeypatch.setattr(analyze_stage, "read_results", lambda _p: None)
    with pytest.raises(KeyboardInterrupt):
        analyze_stage.run(params)
    _assert_stale(reports, "analyze")
    # when analyze finishes, the marker goes (it rewrote every other stamped file)
    analyze_stage.reports_current(params)
    assert not (reports / "STALE.md").exists()


# -- no orphans, one line on Ctrl-C, one writer ---------------------------------------------------

KILLED_SWEEP = textwrap.dedent("""
    import json, os, signal, sys
    import psutil
    from omegaconf import OmegaConf
    from locedit.pipeline import edit as edit_stage
    from locedit.sweep import ResultStore

    original = ResultStore.append

    def append_then_die(self, rows):
        original(self, rows)
        children = psutil.Process().children(recursive=True)
        with open(sys.argv[2], "w") as handle:
            json.dump([[c.pid, c.cmdline()] for c in children], handle)  # before they exit
        os.kill(os.getpid(), signal.SIGKILL)  # kill -9 of the driver

    if __name__ == "__main__":  # spawned workers import this file too
        ResultStore.append = append_then_die
        edit_stage.run(OmegaConf.load(sys.argv[1]))
""")


def test_kill_9_of_a_two_worker_sweep_leaves_no_process_and_no_running_mlflow_run(tmp_path):
    params = _one_fact_params(tmp_path, methods=("ft1",))
    params = OmegaConf.merge(params, {"edit": {"workers": 2, "max_facts": 3, "layers": [0]}})
    params_file = tmp_path / "params.yaml"
    params_file.write_text(OmegaConf.to_yaml(params))
    script, pids_file = tmp_path / "sweep.py", tmp_path / "pids.json"
    script.write_text(KILLED_SWEEP)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    log = tmp_path / "sweep.log"  # a file, not a pipe: an orphan would hold a pipe open
    with log.open("w") as handle:
        done = subprocess.run([sys.executable, str(script), str(params_file), str(pids_file)],
                              env=env, timeout=600, stdout=handle, stderr=subprocess.STDOUT)
    assert done.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    children = json.loads(pids_file.read_text())
    pids = [pid for pid, _ in children]
    # pool workers, told by their command line when the driver died (by now they may be gone)
    assert sum("spawn_main" in " ".join(cmdline) for _, cmdline in children) >= 2
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    left = [p for p in pids if _alive(p)]
    for pid in left:  # do not leave them to the next test
        os.kill(pid, signal.SIGKILL)
    assert not left, f"processes left behind 10 s after kill -9: {left}"

    # the next start ends the killed sweep's MLflow run (it stayed RUNNING) as KILLED
    import mlflow

    running = json.loads((tmp_path / "outputs" / "runs" / "edit.running.json").read_text())
    killed = [running["run_id"], running["pipeline_run_id"]]  # the stage's run and its parent
    client = mlflow.MlflowClient(str(params.mlflow.tracking_uri))
    assert [client.get_run(r).info.status for r in killed] == ["RUNNING", "RUNNING"]
    edit_stage.run(OmegaConf.merge(params, {"edit": {"workers": 1, "max_facts": 1}}))
    assert [client.get_run(r).info.status for r in killed] == ["KILLED", "KILLED"]
    assert not (tmp_path / "outputs" / "runs" / "edit.running.json").exists()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_ctrl_c_prints_one_line_with_what_was_kept(tmp_path, monkeypatch, capsys):
    params = _one_fact_params(tmp_path, methods=("ft1",))
    params = OmegaConf.merge(params, {"edit": {"layers": [0, 1, 2]}})
    params_file = tmp_path / "params.yaml"
    params_file.write_text(OmegaConf.to_yaml(params))
    calls = {"n": 0}
    original = sweep_worker._run_task

    def interrupted(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(sweep_worker, "_run_task", interrupted)
    capsys.readouterr()
    assert cli_main(["run", "edit", "--params", str(params_file)]) == 130
    err = capsys.readouterr().err
    assert err.endswith("\ninterrupted: 1 edits kept, rerun to resume\n") and "Traceback" not in err
    assert not (tmp_path / "outputs" / "edit" / ".lock").exists()


@pytest.mark.parametrize("stage", [trace_stage, stats_stage], ids=["trace", "stats"])
def test_trace_and_stats_take_the_lock(tmp_path, stage):
    name = stage.__name__.rpartition(".")[2]
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        params = _one_fact_params(tmp_path, methods=("ft1",))
        _write_lock(tmp_path / "outputs" / name, holder.pid)
        with pytest.raises(LockHeld, match=f"pid {holder.pid}"):
            stage.run(params)
    finally:
        holder.kill()
        holder.wait()


# -- flags and messages ----------------------------------------------------------------------------


def test_ft_flags_an_exploding_step(tmp_path, monkeypatch):
    from locedit.editing import EditRequest, edited, hparams_for
    from locedit.testing import editable_tiny_model, gpt2_tokenizer

    monkeypatch.chdir(tmp_path)  # Lightning's files, if any
    model, tok = editable_tiny_model("gpt2", n_layers=3), gpt2_tokenizer()
    request = EditRequest("The Eiffel Tower is located in", "Eiffel Tower", "Rome")
    flags, overshoot = {}, {}
    for lr in (1e30, 1e-2):
        hp = hparams_for("ft1", overrides={"lr": lr, "steps": 4, "linf_eps": 1e-2})
        with edited(model, tok, "ft1", request, 1, hp) as result:
            flags[lr] = list(result.flags)
            overshoot[lr] = result.diagnostics.get("ft_max_overshoot")
    assert "ft_step_exploded" in flags[1e30]
    assert "ft_step_exploded" not in flags[1e-2] and "ft_no_progress" not in flags[1e-2]
    assert overshoot[1e30] > 1e20 and overshoot[1e-2] < 10  # Adam's step is about lr = eps


def test_a_missing_data_root_names_it_and_a_command_that_works(tmp_path, monkeypatch):
    root = tmp_path / "nowhere"
    for load in (load_counterfact, load_known, load_zsre):
        with pytest.raises(FileNotFoundError) as err:
            load(root)
        message = str(err.value)
        assert f"the data root {root} (data.root) does not exist" in message
        assert "\n" not in message and "dvc import-url" not in message
        assert f"curl -fL -o {root}/" in message and "https://rome.baulab.info/" in message


@pytest.mark.parametrize(("content", "fix"), [
    (bytes(range(256)) * 4, "fetch .*known_1000.json again from https://"),
    (b'{"known_id": 0}\n{"known_id": 1}\n', "looks like JSON lines"),
])
def test_an_unreadable_data_file_says_what_fixes_it(tmp_path, content, fix):
    (tmp_path / "known_1000.json").write_bytes(content)
    with pytest.raises(DatasetError, match=fix) as err:
        load_known(tmp_path)
    assert "\n" not in str(err.value)


def test_a_stage_without_its_input_says_what_to_run(tmp_path):
    from locedit.pipeline import filter as filter_stage

    params = _one_fact_params(tmp_path, methods=("ft1",))
    with pytest.raises(FileNotFoundError, match=r"prepare/facts.jsonl not found: .*`locedit run prepare`"):
        filter_stage.run(params)


def test_paths_outputs_moves_the_tuned_params_too(tmp_path):
    params = compose_params("conf", [f"paths.outputs={tmp_path / 'elsewhere'}"])
    assert params.edit.tuned_params == f"{tmp_path / 'elsewhere'}/tune/best_hparams.json"


def test_stage_seconds_are_named_for_the_last_invocation(tmp_path):
    for stage, seconds in (("trace", 3.0), ("edit", 5.0)):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "summary.json").write_text(json.dumps({"seconds": seconds}))
    assert analyze_stage._stage_seconds(tmp_path) == {"trace_last_run": 3.0, "edit_last_run": 5.0}
