"""Checks of the command line's options, run right after parsing and before any work.

:func:`check_args` raises :class:`~integrations.moe_ranking.errors.ConfigError` with a message that
says what is wrong and what to do; the command line turns it into ``error: ...`` and exit status 2
(``argparse``'s ``parser.error``) before any data is loaded or anything is written.
"""

from __future__ import annotations

import argparse
import inspect
import math
from typing import Any

from .errors import ConfigError

#: ``--seed`` goes to numpy's and torch's generators: numpy accepts 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1
#: Options that must be integers >= 1 (attribute name on the namespace).
POSITIVE_INTS = (
    "epochs", "batch_size", "patience", "embed_dim", "experts", "top_k", "levels",
    "shared_experts", "task_experts", "threads", "max_rows", "n_train",
)  # fmt: skip


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_numbers(args: argparse.Namespace) -> None:
    for name in POSITIVE_INTS:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ConfigError(f"{_flag(name)} must be an integer >= 1, got {value}")
    lr = getattr(args, "lr", None)
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"--lr must be a finite number > 0 (e.g. 1e-3), got {lr}")
    wd = getattr(args, "weight_decay", None)
    if wd is not None and not (math.isfinite(wd) and wd >= 0):
        raise ConfigError(f"--weight-decay must be a finite number >= 0 (0 disables it), got {wd}")
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed must be an integer from 0 to {MAX_SEED}, got {seed}")
    conflict = getattr(args, "conflict", None)
    if conflict is not None and not 0.0 <= conflict <= 1.0:  # False for NaN
        raise ConfigError(f"--conflict must be in [0, 1], got {conflict}")


def model_options(args: argparse.Namespace) -> dict[str, Any]:
    """The model's keyword options from the command line; an option another model takes is an
    error."""
    options: dict[str, Any] = {}
    if args.experts is not None:
        if args.model not in ("mmoe", "sparse-moe", "grec"):
            raise ConfigError("--experts applies to --model mmoe, sparse-moe or grec")
        options["num_experts"] = args.experts
    if args.top_k is not None:
        if args.model not in ("sparse-moe", "grec"):
            raise ConfigError("--top-k applies to --model sparse-moe or grec")
        options["top_k"] = args.top_k
    for flag in ("routing", "capacity_factor", "router_jitter"):
        if getattr(args, flag, None) is not None:
            if args.model != "grec":
                raise ConfigError(f"{_flag(flag)} applies to --model grec, not {args.model}")
            options[flag] = getattr(args, flag)
    for flag, key in (("levels", "num_levels"), ("shared_experts", "num_shared")):
        if getattr(args, flag) is not None:
            if args.model != "ple":
                raise ConfigError(f"{_flag(flag)} applies to --model ple")
            options[key] = getattr(args, flag)
    if args.task_experts is not None:
        if args.model != "ple":
            raise ConfigError("--task-experts applies to --model ple")
        options["num_specific"] = args.task_experts
    return options


def _check_routing(model: str, options: dict[str, Any]) -> None:
    """Top-k routing: at least two experts to route between, and ``1 <= k <= experts``."""
    from .models import _model_class

    params = inspect.signature(_model_class(model)).parameters
    if "top_k" not in params or "num_experts" not in params:
        return
    experts = options.get("num_experts", params["num_experts"].default)
    top_k = options.get("top_k", params["top_k"].default)
    source = "--experts" if "num_experts" in options else f"the default of --model {model}"
    if experts < 2:
        raise ConfigError(
            f"--model {model} routes each token to --top-k of --experts experts and needs at "
            f"least 2 experts, got --experts {experts}"
        )
    if top_k > experts:
        raise ConfigError(
            f"--top-k {top_k} exceeds the number of experts ({experts}, {source}); choose "
            f"--top-k from 1 to {experts} or raise --experts"
        )


def _check_data(args: argparse.Namespace) -> None:
    num_tasks = getattr(args, "num_tasks", None)
    if num_tasks is not None:
        from .data.movielens import MAX_GENRE_TASKS, MIN_GENRE_TASKS

        if args.data != "movielens":
            raise ConfigError(f"--num-tasks applies to --data movielens, not {args.data}")
        if not MIN_GENRE_TASKS <= num_tasks <= MAX_GENRE_TASKS:
            raise ConfigError(
                f"--num-tasks must be from {MIN_GENRE_TASKS} to {MAX_GENRE_TASKS} (MovieLens has "
                f"19 genres to group), got {num_tasks}"
            )
        if getattr(args, "esmm", False):
            raise ConfigError(
                "--esmm needs funnel tasks; the genre tasks of --num-tasks are not nested "
                "(leave out --num-tasks for like -> five_star)"
            )


def check_args(args: argparse.Namespace) -> None:
    """Every check of the parsed options that needs neither data nor training."""
    _check_numbers(args)
    _check_data(args)
    if getattr(args, "model", None) is not None:  # fit and demo
        _check_routing(args.model, model_options(args))
    if getattr(args, "out", None) is not None:
        from .outputs import refuse_unsafe

        refuse_unsafe(args.out)
