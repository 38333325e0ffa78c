"""An HTML template for ``dvc plots show`` that renders without internet.

DVC's default page loads vega, vega-lite and vega-embed from a CDN, so on a machine without
network access (a cluster node) it stays blank. This template inlines the three libraries from
vl-convert-python's bundle (a pinned PyPI package) and leaves out DVC's ``{scripts}``
placeholder, where the CDN tags would go. ``.dvc/config`` names it (``plots.html_template``);
``make setup`` writes it:

    python -m locedit.analysis.plots_page .dvc/plots/offline.html
"""

from __future__ import annotations

import argparse
from pathlib import Path

#: Vega-Lite 5, the schema of DVC's plot templates (``.dvc/plots/series.json``).
VEGA_LITE_VERSION = "5.21"

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <script type="text/javascript">
    (() => {
__BUNDLE__
    })();
    </script>
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def offline_template(vl_version: str = VEGA_LITE_VERSION) -> str:
    """DVC's page with vega, vega-lite and vega-embed inline (``window.vegaEmbed`` and so on;
    wrapped in a function so the bundle's top-level names cannot clash with DVC's ``spec``)."""
    import vl_convert

    bundle = vl_convert.javascript_bundle(vl_version=vl_version)
    if "</script" in bundle.lower() or "{plot_divs}" in bundle:
        raise ValueError("the vl-convert bundle cannot be inlined into DVC's template")
    return PAGE.replace("__BUNDLE__", bundle)


def write_template(path: Path, vl_version: str = VEGA_LITE_VERSION) -> Path:
    from locedit.storage import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, offline_template(vl_version))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, nargs="?", default=Path(".dvc/plots/offline.html"))
    parser.add_argument("--vl-version", default=VEGA_LITE_VERSION)
    args = parser.parse_args(argv)
    print(f"wrote {write_template(args.output, args.vl_version)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
