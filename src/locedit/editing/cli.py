"""``locedit edit``: edit one fact with any method and print probabilities before and after.

Wire it into the console script with ``add_edit_parser(subparsers)``; until then it runs as
``python -m locedit.editing ...``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def add_edit_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "edit",
        help="edit one fact (ROME, MEMIT, FT-1, FT-5, EMMET, AlphaEdit) and print p(target) before/after",
    )
    _add_arguments(parser)
    parser.set_defaults(func=run_edit)
    return parser


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    from locedit.editing.methods import ALL_METHODS

    parser.add_argument(
        "--prompt", required=True, help='filled-in prompt, e.g. "The Eiffel Tower is in"'
    )
    parser.add_argument("--subject", required=True, help="the subject as it occurs in the prompt")
    parser.add_argument("--target", required=True, help="object to make likely (or unlikely)")
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="OBJECT",
        help="another object whose probability to print (e.g. the true one)",
    )
    parser.add_argument(
        "--method",
        action="append",
        choices=[*ALL_METHODS, "all"],
        help="edit method (repeatable; default and 'all': the paper's four, ROME MEMIT FT-1 FT-5)",
    )
    parser.add_argument(
        "--layer", type=int, default=None, help="0-based edit layer (default: the method's default)"
    )
    parser.add_argument("--direction", choices=["maximize", "minimize"], default="maximize")
    parser.add_argument(
        "--params", default="params.yaml", help="composed params (default conf/ if absent)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="param override, e.g. method.rome.kl_factor=0.9",
    )


def _params(path: str, overrides: list[str], methods: list[str]):
    from locedit.params import apply_overrides, compose_params, load_params

    params = load_params(path) if Path(path).exists() else compose_params("conf")
    # one edit without a problem: problem.overrides never apply here
    return apply_overrides(params, overrides, methods=methods, problems=[None])


def check_layer_arg(layer: int | None, depth: int) -> None:
    """Refuse ``--layer`` outside the model's layers, from its config, before weights load."""
    if layer is not None and not 0 <= layer < depth:
        raise IndexError(f"--layer {layer} out of range: the model has layers 0..{depth - 1}")


def run_edit(args: argparse.Namespace) -> int:
    from locedit.editing import (
        METHODS,
        CovarianceStore,
        EditRequest,
        default_layer,
        edited,
        hparams_for,
    )
    from locedit.models.architecture import n_layers
    from locedit.models.scoring import target_log_probs
    from locedit.models.tokens import encode_prompt, encode_target
    from locedit.params import model_depth, model_from_params

    methods = list(METHODS) if not args.method or "all" in args.method else args.method
    params = _params(args.params, args.set, methods)
    check_layer_arg(args.layer, model_depth(params))
    model, tokenizer = model_from_params(params)
    store = CovarianceStore.from_params(params, tokenizer)
    request = EditRequest(args.prompt, args.subject, args.target, args.direction)
    prompt_ids = encode_prompt(tokenizer, args.prompt, args.subject).input_ids
    objects = [args.target, *args.compare]
    targets = [encode_target(tokenizer, args.prompt, obj) for obj in objects]

    def probabilities() -> list[float]:
        return target_log_probs(model, [prompt_ids] * len(targets), targets).exp().tolist()

    before = probabilities()
    print(f"{args.prompt!r} ({args.direction} p({args.target!r}))")
    print(
        "  unedited: "
        + ", ".join(f"p({o!r}) = {p:.4g}" for o, p in zip(objects, before, strict=True))
    )
    for method in methods:
        layer = args.layer if args.layer is not None else default_layer(method, n_layers(model))
        hparams = hparams_for(method, params)
        with edited(model, tokenizer, method, request, layer, hparams, store) as result:
            after = probabilities()
        shown = ", ".join(f"p({o!r}) = {p:.4g}" for o, p in zip(objects, after, strict=True))
        flags = f" flags {result.flags}" if result.flags else ""
        print(f"  {method:9s} layers {result.layers}: {shown}  ({result.seconds:.1f} s){flags}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m locedit.editing", description=__doc__)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return run_edit(args)
    except (FileNotFoundError, ValueError, RuntimeError, IndexError) as err:
        log.error("%s", err)  # one line, as `locedit edit` gives it
        return 2


if __name__ == "__main__":
    sys.exit(main())
