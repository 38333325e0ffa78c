"""No stale or lost results (issue 17): code-versioned keys, torn-write repair, outputs that
cannot lie, and one writer at a time, each replayed on a tiny model."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from omegaconf import OmegaConf

from locedit import versioning
from locedit.cli import main as cli_main
from locedit.data.records import FactRecord
from locedit.pipeline import edit as edit_stage
from locedit.pipeline import tune as tune_stage
from locedit.storage import LockHeld, output_lock, repair_jsonl
from locedit.sweep import ResultStore, results_table, run_sweep
from locedit.sweep import worker as sweep_worker
from locedit.tracing.cache import tracing_key, zeroing_key
from tests.test_sweep import FACTS, make_params


@pytest.fixture(autouse=True)
def _fresh_versions():
    versioning.clear_caches()
    yield
    versioning.clear_caches()


def _changed_source(monkeypatch, module: str) -> None:
    """Pretend ``module``'s source file changed (as an edit of the file would)."""
    original = versioning.read_source
    monkeypatch.setattr(
        versioning, "read_source",
        lambda name: original(name) + (b"\n# changed\n" if name == module else b""),
    )
    versioning.clear_caches()


# -- code versions ------------------------------------------------------------------------------


def test_code_version_follows_imports_and_nothing_else(tmp_path, monkeypatch):
    pkg = tmp_path / "verpkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from verpkg.core import helper\n")
    (pkg / "core.py").write_text("def helper():\n    return 1\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "user.py").write_text("from verpkg import helper\n\ndef f():\n    return helper()\n")
    (pkg / "other.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    assert versioning.module_closure("verpkg.sub.user") == ["verpkg.core", "verpkg.sub.user"]
    before = versioning.code_version("verpkg.sub.user")
    (pkg / "other.py").write_text("X = 2\n")  # not imported by user: reuse
    versioning.clear_caches()
    assert versioning.code_version("verpkg.sub.user") == before
    (pkg / "core.py").write_text("def helper():\n    return 2\n")  # imported (re-export): recompute
    versioning.clear_caches()
    assert versioning.code_version("verpkg.sub.user") != before
    # a whole package counts every module under it
    whole = versioning.package_version("verpkg")
    (pkg / "other.py").write_text("X = 3\n")
    versioning.clear_caches()
    assert versioning.package_version("verpkg") != whole


def test_content_key_covers_model_record_params_and_code():
    base = dict(model="m1", record={"prompt": "a"}, params={"x": 1}, code="c1")
    key = versioning.content_key("k", **base)
    for field, other in [("model", "m2"), ("record", {"prompt": "b"}), ("params", {"x": 2}), ("code", "c2")]:
        assert versioning.content_key("k", **{**base, field: other}) != key, field
    assert versioning.content_key("other", **base) != key
    assert versioning.content_key("k", **base) == key


def test_tracing_keys_change_with_their_code_and_record_only(monkeypatch):
    fact = FACTS[0]
    trace = tracing_key("fp", fact, "mlp", 5, 3, 0.5, 0)
    zero = zeroing_key("fp", fact, "mlp", 5)
    edited = FactRecord(fact.fact_id, fact.subject, fact.prompt, "London")  # same id, new content
    assert tracing_key("fp", edited, "mlp", 5, 3, 0.5, 0) != trace
    _changed_source(monkeypatch, "locedit.editing.rome")  # unrelated to tracing
    assert (tracing_key("fp", fact, "mlp", 5, 3, 0.5, 0), zeroing_key("fp", fact, "mlp", 5)) == (trace, zero)
    _changed_source(monkeypatch, "locedit.tracing.causal_trace")
    assert tracing_key("fp", fact, "mlp", 5, 3, 0.5, 0) != trace
    assert zeroing_key("fp", fact, "mlp", 5) == zero


def _one_fact_params(tmp_path, methods=("rome", "ft1")):
    params = make_params(tmp_path, methods=methods, problems=("error_injection",))
    return OmegaConf.merge(params, {
        "edit": {"layers": [1], "max_facts": 1, "workers": 1, "essence": {"enabled": False}},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"},
    })


def test_a_code_change_reruns_the_rows_it_affects_and_nothing_else(tmp_path, monkeypatch):
    params = _one_fact_params(tmp_path)
    spec = edit_stage.build_spec(params)
    assert run_sweep(spec, progress=False) == 2
    # an unrelated module changed: every row is reused
    _changed_source(monkeypatch, "locedit.tracing.plots")
    assert run_sweep(edit_stage.build_spec(params), progress=False) == 0
    # finetuning's code changed: its row reruns, ROME's is reused
    _changed_source(monkeypatch, "locedit.editing.finetune")
    spec = edit_stage.build_spec(params)
    ran = []
    original = sweep_worker._run_task
    monkeypatch.setattr(sweep_worker, "_run_task", lambda *a: ran.append(a[4].method) or original(*a))
    assert run_sweep(spec, progress=False) == 1 and ran == ["ft1"]
    table = results_table(ResultStore(spec.out_dir).rows(), [t.key for t in spec.tasks])
    assert len(table) == 2 and (table.status == "ok").all()
    # the metrics' code changed: every row reruns
    _changed_source(monkeypatch, "locedit.metrics.scores")
    assert run_sweep(edit_stage.build_spec(params), progress=False) == 2


def test_an_edited_record_with_the_same_id_is_re_edited(tmp_path):
    params = _one_fact_params(tmp_path, methods=("ft1",))
    spec = edit_stage.build_spec(params)
    changed = FactRecord(**{**spec.records["f1"].__dict__, "target_new": "Berlin"})
    from locedit.sweep import plan_tasks

    other = plan_tasks([changed], [1], spec.hparams, spec.context)
    assert [t.key for t in other] != [t.key for t in spec.tasks]
    assert other[0].seed_key == spec.tasks[0].seed_key  # same id, layer, method, parameters


# -- torn writes ------------------------------------------------------------------------------


def test_repair_cuts_a_torn_tail_and_drops_invalid_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"key": "a"}\n{"key": "b"}\n{"key": "c", "val')
    assert repair_jsonl(path) == 1
    assert path.read_text() == '{"key": "a"}\n{"key": "b"}\n'
    path.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    assert repair_jsonl(path) == 1 and path.read_text() == '{"key": "a"}\n{"key": "b"}\n'
    assert repair_jsonl(path) == 0


def test_a_torn_row_from_a_full_disk_loses_no_finished_edit(tmp_path, monkeypatch):
    params = _one_fact_params(tmp_path, methods=("ft1",))
    params = OmegaConf.merge(params, {"edit": {"layers": [0, 1, 2], "max_facts": 2}})
    spec = edit_stage.build_spec(params)
    assert len(spec.tasks) == 6
    calls = {"n": 0}
    original = sweep_worker._run_task

    def interrupted(*args):
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        calls["n"] += 1
        return original(*args)

    monkeypatch.setattr(sweep_worker, "_run_task", interrupted)
    with pytest.raises(OSError):
        run_sweep(spec, progress=False)
    store = ResultStore(spec.out_dir)
    finished = store.rows()
    assert len(finished) == 3
    with store.path.open("a") as handle:  # the fourth row, torn by the full disk
        handle.write(json.dumps({"key": spec.tasks[3].key, "status": "ok"})[:25])
    (spec.out_dir / "pre" / "f1-x.json.123.tmp").write_text("")

    monkeypatch.setattr(sweep_worker, "_run_task", original)
    edit_stage.run(params)
    lines = store.path.read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # every line whole
    assert rows[:3] == finished and len(rows) == 6
    assert {r["key"] for r in rows} == {t.key for t in spec.tasks}
    assert not list(spec.out_dir.rglob("*.tmp"))
    summary = json.loads((spec.out_dir / "summary.json").read_text())
    assert summary["edits"] == 6 and summary["ran_now"] == 3


# -- outputs that cannot lie, one writer ----------------------------------------------------------


def test_an_interrupted_run_leaves_no_previous_summary(tmp_path, monkeypatch):
    params = _one_fact_params(tmp_path, methods=("ft1",))
    out = tmp_path / "outputs" / "edit"
    out.mkdir(parents=True)
    for name in ("results.parquet", "results.csv"):
        (out / name).write_text("old")
    (out / "summary.json").write_text('{"edits": 256, "status_ok": 256}')

    def killed(*_args):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep_worker, "_run_task", killed)
    with pytest.raises(KeyboardInterrupt):
        edit_stage.run(params)
    assert not any((out / name).exists() for name in edit_stage.FINAL_OUTPUTS)
    assert not (out / ".lock").exists()  # released on the way out


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(directory, pid, host=None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ".lock").write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "since": 0}))


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "edit"
        _write_lock(out, holder.pid)
        with pytest.raises(LockHeld) as info:
            with output_lock(out, "edit"):
                pass
        message = str(info.value)
        assert f"pid {holder.pid} on {socket.gethostname()}" in message and "\n" not in message
        # through the CLI: exit status 2 and that one line
        params = _one_fact_params(tmp_path, methods=("ft1",))
        params_file = tmp_path / "params.yaml"
        params_file.write_text(OmegaConf.to_yaml(params))
        _write_lock(tmp_path / "outputs" / "edit", holder.pid)
        assert cli_main(["run", "edit", "--params", str(params_file)]) == 2
        assert f"pid {holder.pid}" in caplog.text
        _write_lock(tmp_path / "outputs" / "tune", holder.pid)
        with pytest.raises(LockHeld, match=f"pid {holder.pid}"):
            tune_stage.run(params)
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_taken_over_and_released(tmp_path):
    out = tmp_path / "edit"
    _write_lock(out, _dead_pid())
    with output_lock(out, "edit") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with pytest.raises(LockHeld):  # not even this process twice
            with output_lock(out, "edit"):
                pass
    assert not (out / ".lock").exists()
    (out / ".lock").write_text("garbage")  # unreadable: stale too
    with output_lock(out, "edit"):
        pass


def test_concurrent_writers_one_wins(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from locedit.storage import LockHeld, output_lock
        try:
            with output_lock({str(tmp_path)!r}, "edit"):
                print("held", flush=True)
                time.sleep(3)
        except LockHeld:
            print("refused", flush=True)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outputs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outputs == ["held", "refused"]


def test_pre_edit_covariance_and_tune_keys_follow_their_own_code(tmp_path, monkeypatch):
    from locedit.editing import CorpusSpec, CovarianceStore
    from locedit.sweep.worker import pre_edit_key
    from locedit.testing import tiny_model

    store = CovarianceStore(tmp_path, CorpusSpec(n_samples=4, sample_length=8))
    model = tiny_model("gpt2", n_layers=2)

    def keys():
        versioning.clear_caches()
        return {
            "pre": pre_edit_key(FACTS[0], ["error_injection"], "ctx"),
            "cov": store.statistics_key(model),
            "tune": tune_stage.code_version(),
        }

    before = keys()
    assert pre_edit_key(FACTS[1], ["error_injection"], "ctx") != before["pre"]
    _changed_source(monkeypatch, "locedit.analysis.figures")  # none of them
    assert keys() == before
    monkeypatch.undo()
    _changed_source(monkeypatch, "locedit.editing.rome")  # tuning scores ROME edits
    after = keys()
    assert after["tune"] != before["tune"] and after["pre"] == before["pre"] and after["cov"] == before["cov"]
    monkeypatch.undo()
    _changed_source(monkeypatch, "locedit.editing.corpus")  # the statistics' corpus sampler
    assert keys()["cov"] != before["cov"]
    monkeypatch.undo()
    _changed_source(monkeypatch, "locedit.metrics.evaluation")
    assert keys()["pre"] != before["pre"]


def test_an_edit_without_a_row_fails_the_stage_instead_of_a_short_table(tmp_path, monkeypatch):
    params = _one_fact_params(tmp_path, methods=("ft1",))
    params = OmegaConf.merge(params, {"edit": {"layers": [0, 1]}})
    original = ResultStore.append

    def lossy(self, rows):  # a row that never reaches the disk
        rows = list(rows)
        return original(self, [r for r in rows if r["layer"] != 0])

    monkeypatch.setattr(ResultStore, "append", lossy)
    with pytest.raises(RuntimeError, match="1 of 2 edits have no result row"):
        edit_stage.run(params)
    assert not (tmp_path / "outputs" / "edit" / "summary.json").exists()
    monkeypatch.setattr(ResultStore, "append", original)
    edit_stage.run(params)  # the rerun computes the missing edit
    summary = json.loads((tmp_path / "outputs" / "edit" / "summary.json").read_text())
    assert summary["edits"] == 2 and summary["ran_now"] == 1


def test_missing_shared_data_fails_in_ci_and_skips_elsewhere(tmp_path, monkeypatch):
    from conftest import require_shared_data

    missing = tmp_path / "no-data"
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_shared_data(missing)
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        require_shared_data(missing)
    assert require_shared_data(tmp_path) == tmp_path


def test_an_interrupted_tune_leaves_no_previous_choice(tmp_path, monkeypatch):
    params = _one_fact_params(tmp_path, methods=("ft1",))
    out = tmp_path / "outputs" / "tune"
    (out / "studies").mkdir(parents=True)
    (out / tune_stage.TUNED_FILE).write_text('{"hparams": {"error_injection": {"ft1": {"linf_eps": 1}}}}')

    def killed(_params):
        raise KeyboardInterrupt

    monkeypatch.setattr(tune_stage, "_run_locked", killed)
    with pytest.raises(KeyboardInterrupt):
        tune_stage.run(params)
    assert not (out / tune_stage.TUNED_FILE).exists() and not (out / ".lock").exists()
