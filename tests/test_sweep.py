"""The edit sweep: row count, resume without recomputation, failure rows, and Ray equality."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest
from omegaconf import OmegaConf

from locedit.data.records import FactRecord, write_records
from locedit.pipeline import edit as edit_stage
from locedit.pipeline.common import compose_params
from locedit.sweep import ResultStore, results_table, run_sweep, runner
from locedit.sweep import worker as sweep_worker
from locedit.testing import save_tiny

FACTS = [
    FactRecord("f1", "Eiffel Tower", "The Eiffel Tower is located in", "Paris", "Rome",
               ("Where is the Eiffel Tower? It is in",), ("The Louvre is located in",),
               extra={"erasure_ok": True}),
    FactRecord("f2", "Danielle Darrieux", "Danielle Darrieux speaks", "French", "English",
               ("The language of Danielle Darrieux is",), ("Michel Rocard speaks",),
               extra={"erasure_ok": True}),
    FactRecord("f3", "Toko Yasuda", "Toko Yasuda plays the", "guitar", "piano",
               (), ("Jimi Hendrix plays the",), extra={"erasure_ok": False}),
]
TIMING = ["seconds", "diagnostics", "key"]


def make_params(tmp_path, methods=("rome", "ft1"), problems=("error_injection", "fact_amplification")):
    model_dir = save_tiny(tmp_path / "tiny", "gpt2", n_layers=3)
    params = compose_params(
        "conf",
        [
            f"model.name={model_dir}",
            f"paths.outputs={tmp_path / 'outputs'}", f"paths.reports={tmp_path / 'reports'}",
            f"edit.methods=[{','.join(methods)}]",
            f"edit.problems=[{','.join(problems)}]",
            "edit.layers=[0,2]", "edit.threads=1",
            "edit.essence.n_samples=2", "edit.essence.max_new_tokens=4",
            "trace.noise_sigma=0.5", "trace.noise_samples=3",
            "stats.n_samples=8", "stats.sample_length=12",
            "method.rome.v_steps=4", "method.rome.n_context_templates=2",
            "method.ft.steps=3",
        ],
    )
    write_records(tmp_path / "outputs" / "filter" / "facts.jsonl", FACTS)
    return params


def comparable(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.drop(columns=[c for c in TIMING if c in frame.columns])


def test_sweep_rows_resume_and_ray_equality(tmp_path, monkeypatch):
    params = make_params(tmp_path)
    spec = edit_stage.build_spec(params)
    assert len(spec.tasks) == 3 * 2 * 2 * 2 == 24

    # interrupt after 7 edits, as a kill would
    calls = {"n": 0}
    original = sweep_worker._run_task

    def interrupted(*args, **kwargs):
        if calls["n"] == 7:
            raise KeyboardInterrupt
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(sweep_worker, "_run_task", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, progress=False)
    first_rows = ResultStore(spec.out_dir).rows()
    assert len(first_rows) == 7

    monkeypatch.setattr(sweep_worker, "_run_task", original)
    ran = run_sweep(spec, progress=False)
    assert ran == 17
    rows = ResultStore(spec.out_dir).rows()
    assert len(rows) == 24 and rows[:7] == first_rows
    table = results_table(rows, [t.key for t in spec.tasks])
    assert len(table) == 24
    # every edit of this plan applies and succeeds (no failure is left unexplained)
    assert (table.status == "ok").all(), table[table.status != "ok"][["key", "reason"]].to_string()
    ok = table
    assert set(ok.method) == {"rome", "ft1"}
    assert ok["rewrite_score"].notna().all() and ok["neighborhood_score"].between(-1e-9, 1 + 1e-9).all()
    assert run_sweep(spec, progress=False) == 0

    # the Ray executor gives the same table
    ray_params = OmegaConf.merge(params, {"paths": {"outputs": str(tmp_path / "ray_outputs")}})
    write_records(tmp_path / "ray_outputs" / "filter" / "facts.jsonl", FACTS)
    ray_spec = edit_stage.build_spec(ray_params)
    assert run_sweep(ray_spec, executor="ray", workers=2, progress=False) == 24
    ray_table = results_table(ResultStore(ray_spec.out_dir).rows(), [t.key for t in ray_spec.tasks])
    pd.testing.assert_frame_equal(comparable(table), comparable(ray_table))


def test_bad_target_and_nan_edit_become_failure_rows(tmp_path, monkeypatch):
    params = make_params(tmp_path, methods=("ft1",), problems=("error_injection",))
    broken = FactRecord("bad", "Eiffel Tower", "The Eiffel Tower is in", "Paris", " ")
    write_records(tmp_path / "outputs" / "filter" / "facts.jsonl", [FACTS[0], broken])
    # the params refuse a NaN step (test_overrides.py): put it into the built hyperparameters
    resolved = edit_stage.resolved_hparams
    monkeypatch.setattr(
        edit_stage,
        "resolved_hparams",
        lambda *args: {k: dataclasses.replace(h, lr=float("nan")) for k, h in resolved(*args).items()},
    )
    spec = edit_stage.build_spec(params)
    run_sweep(spec, progress=False)
    table = results_table(ResultStore(spec.out_dir).rows())
    assert len(table) == 4 and (table.status == "failed").all()
    bad = table[table.fact_id == "bad"]
    assert bad.reason.str.contains("empty target").all()
    nan_rows = table[table.fact_id == "f1"]
    assert nan_rows.reason.str.contains("NaN|non-finite|nan", case=False).all()
    assert "rewrite_score" not in nan_rows or nan_rows["rewrite_score"].isna().all()


def test_local_workers_stream_rows_and_match_one_process(tmp_path):
    """Two local worker processes with jobs of two facts (edit.group_size 4 over two layers)
    put each row on the driver's queue as it finishes: the driver stores every row once, and
    the table equals one process's."""
    params = make_params(tmp_path, methods=("rome",), problems=("error_injection",))
    params = OmegaConf.merge(params, {"edit": {"group_size": 4}})
    spec = edit_stage.build_spec(params)
    one = run_sweep(spec, progress=False)
    table = results_table(ResultStore(spec.out_dir).rows(), [t.key for t in spec.tasks])
    parallel = OmegaConf.merge(params, {"paths": {"outputs": str(tmp_path / "parallel")}})
    write_records(tmp_path / "parallel" / "filter" / "facts.jsonl", FACTS)
    parallel_spec = edit_stage.build_spec(parallel)
    seen: list[int] = []
    assert run_sweep(parallel_spec, workers=2, progress=False,
                     on_rows=lambda rows: seen.append(len(rows))) == one == 6
    rows = ResultStore(parallel_spec.out_dir).rows()
    assert sum(seen) == len(rows) == 6 and len({r["key"] for r in rows}) == 6
    other = results_table(rows, [t.key for t in parallel_spec.tasks])
    pd.testing.assert_frame_equal(comparable(table), comparable(other), rtol=1e-5)


def test_a_pool_job_puts_each_row_on_the_queue_as_it_finishes(tmp_path, monkeypatch):
    """What a local worker runs: every row onto the queue at once (not at the job's end), the
    count returned for the driver's accounting; the driver takes what is waiting."""
    import queue

    params = make_params(tmp_path, methods=("ft1",), problems=("error_injection",))
    spec = edit_stage.build_spec(params)
    rows: queue.Queue = queue.Queue()
    monkeypatch.setattr(runner, "_ROWS", rows)
    waiting = []
    original = sweep_worker._run_task

    def noted(*args, **kwargs):  # how many rows were on the queue when each edit started
        waiting.append(rows.qsize())
        return original(*args, **kwargs)

    monkeypatch.setattr(sweep_worker, "_run_task", noted)
    tasks = [t for t in spec.tasks if t.fact_id == "f1"]
    assert runner._run_pool_job(spec, ("f1",), tasks) == len(tasks) == 2
    assert waiting == [0, 1]
    stored = runner._taken(rows, 0)
    assert [r["key"] for r in stored] == [t.key for t in tasks]
    assert runner._taken(rows, 0) == []


def test_ray_actors_on_gpus_stream_rows_and_match_one_process(tmp_path, monkeypatch):
    """The Ray executor's GPU path (one actor per worker, a model replica each), on a cluster
    that declares two GPUs (Ray's resources, no device: model.device=auto stays on the CPU
    here): the driver, which has no GPU, packs the jobs for GPU workers (a group of up to 64
    edits, so all three facts in one job); the rows come back through the Ray queue and equal
    one process's."""
    ray = pytest.importorskip("ray")
    packed = []
    pending_jobs = runner.pending_jobs
    monkeypatch.setattr(runner, "pending_jobs", lambda tasks, done, per_job=1: (
        packed.append(per_job) or pending_jobs(tasks, done, per_job)
    ))
    params = make_params(tmp_path, methods=("rome",), problems=("error_injection",))
    spec = edit_stage.build_spec(params)
    assert run_sweep(spec, progress=False) == 6
    table = results_table(ResultStore(spec.out_dir).rows(), [t.key for t in spec.tasks])
    on_gpus = OmegaConf.merge(params, {"paths": {"outputs": str(tmp_path / "actors")}})
    write_records(tmp_path / "actors" / "filter" / "facts.jsonl", FACTS)
    actor_spec = edit_stage.build_spec(on_gpus)
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert ray.cluster_resources().get("GPU") == 2
        assert run_sweep(actor_spec, executor="ray", workers=2, progress=False) == 6
    finally:
        ray.shutdown()
    assert packed == [1, 32]  # one process on this CPU; GPU actors: 64 edits / 2 layers
    rows = ResultStore(actor_spec.out_dir).rows()
    assert len({r["key"] for r in rows}) == len(rows) == 6
    other = results_table(rows, [t.key for t in actor_spec.tasks])
    pd.testing.assert_frame_equal(comparable(table), comparable(other), rtol=1e-5)
