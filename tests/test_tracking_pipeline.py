"""Issue 27: how stage processes find their pipeline run, and `dvc plots show` offline."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from locedit.tracking.pipeline import PIPELINE_ENV

ROOT = Path(__file__).resolve().parents[1]
KEY_CODE = "from locedit.tracking.pipeline import invocation_key; print(invocation_key())"


def _key_of_child(env: dict[str, str]) -> str:
    """The key a stage command computes when this process starts it as DVC does: `$SHELL -c`."""
    command = f"{sys.executable} -c '{KEY_CODE}'; true"  # `; true`: bash cannot exec it away
    done = subprocess.run(
        ["bash", "--noprofile", "--norc", "-c", command],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    )
    return done.stdout.strip()


def test_stages_of_one_dvc_process_share_a_key_and_other_processes_do_not():
    env = {k: v for k, v in os.environ.items() if k != PIPELINE_ENV}
    env["PYTHONPATH"] = f"{ROOT / 'src'}{os.pathsep}{env.get('PYTHONPATH', '')}"
    under_dvc = dict(env, DVC_STAGE="trace")
    first, second = _key_of_child(under_dvc), _key_of_child(under_dvc)
    # keyed by the process that started them (here this one, under DVC `dvc repro`), past the shell
    assert first == second and first.startswith("dvc:")
    assert first.split(":")[2] == str(os.getpid())
    alone = [_key_of_child(env) for _ in range(2)]  # `locedit run X` by hand: each its own
    assert alone[0] != alone[1] and all(k.startswith("process:") for k in alone)
    assert _key_of_child(dict(under_dvc, **{PIPELINE_ENV: "beyond-1"})) == "env:beyond-1"


def test_offline_plots_template_inlines_vega_and_dvc_renders_with_it(tmp_path):
    from dvc_render.html import render_html
    from dvc_render.vega import VegaRenderer

    from locedit.analysis.plots_page import write_template

    template = write_template(tmp_path / "offline.html")
    page = template.read_text()
    assert "{plot_divs}" in page and "{scripts}" not in page  # DVC's CDN tags have no place
    assert not re.search(r"<script[^>]+src=", page)
    assert "vegaEmbed" in page and "vegaLite" in page
    datapoints = [{"layer": 0, "effect": 0.1, "series": "a", "rev": "workspace"}]
    renderer = VegaRenderer(datapoints, "reports/plots/trace.csv", x="layer", y="effect")
    out = render_html([renderer], tmp_path / "dvc_plots" / "index.html", template)
    html = Path(out).read_text()
    assert "cdn.jsdelivr" not in html and "http://" not in html.split("<body>")[1][:2000]
    assert "vegaEmbed('#reports_plots_trace_csv'" in html
    # .dvc/config names the file `make setup` writes (relative to .dvc/)
    config = (ROOT / ".dvc" / "config").read_text()
    assert re.search(r"html_template = plots/offline\.html", config)
    assert "offline.html" in (ROOT / "Makefile").read_text()
