"""The `dllm-rl` command.

    dllm-rl sft RECIPE [section.key=value ...]        masked-diffusion SFT (or edit-head SFT: sft.objective=edit)
    dllm-rl train RECIPE [section.key=value ...]      the recipe's algorithm (grpo, dpo, sft, planner_sft, consensus)
    dllm-rl generate CHECKPOINT --prompt TEXT [--prompt TEXT ...] [rollout.key=value ...]
    dllm-rl eval RECIPE --checkpoint CHECKPOINT [--hybrid-axes] [section.key=value ...]
    dllm-rl plan RECIPE --gpus N [--prompt-length P]  per-GPU memory estimate (formulas, not a measurement)

Mistakes in the input (a recipe key, a path, a checkpoint that is not a model) print one line and exit
with code 2; `--traceback` (or DLLM_RL_TRACEBACK=1) shows the full traceback. Only argparse, yaml and the
recipe are imported before a command needs more: help and recipe errors answer at once (torch, transformers
and the trainers load inside the commands).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from dataclasses import replace
from pathlib import Path

from .errors import ConfigError, DllmRlError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dllm-rl", description="RL post-training for diffusion LMs")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in [("sft", "masked-diffusion SFT"), ("train", "train with the recipe's algorithm")]:
        s = sub.add_parser(name, help=help_)
        s.add_argument("recipe")
        s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-5")
    g = sub.add_parser("generate", help="decode prompts with a checkpoint")
    g.add_argument("checkpoint")
    g.add_argument("--prompt", action="append", required=True, help="a user message (repeatable)")
    g.add_argument("--raw", action="store_true", help="use the prompt text as is, without the chat template")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("overrides", nargs="*", help="rollout overrides, e.g. rollout.steps=16")
    e = sub.add_parser("eval", help="held-out accuracy of a checkpoint")
    e.add_argument("recipe")
    e.add_argument("--checkpoint", required=True)
    e.add_argument(
        "--hybrid-axes",
        action="store_true",
        help="the three hybrid axes: accuracy under each plan kind, diversity, pass@k and maj@k (axes.py)",
    )
    e.add_argument("--samples", type=int, default=8, help="--hybrid-axes: samples per prompt for the diversity axis")
    e.add_argument("overrides", nargs="*")
    pl = sub.add_parser("plan", help="per-GPU memory estimate for a recipe")
    pl.add_argument("recipe")
    pl.add_argument("--gpus", type=int, default=1)
    pl.add_argument("--prompt-length", type=int, default=None, help="prompt tokens (default: a guess, 256)")
    pl.add_argument(
        "--fused-logprobs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="log-probs by the fused kernel (default: as the estimators do on a GPU)",
    )
    pl.add_argument("overrides", nargs="*")
    for command in sub.choices.values():  # also after the command (`dllm-rl train R --traceback`); SUPPRESS: unset
        command.add_argument(  # unless given there, so `dllm-rl --traceback train R` still counts
            "--traceback", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks on errors"
        )
    return p


# recipe.algorithm -> (module under dllm_rl.trainers, trainer class), imported when used
def cmd_train(args, force_sft: bool) -> None:

    from .config import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)  # every value checked against its field: no torch needed
    if force_sft and recipe.algorithm != "sft":
        raise ConfigError(
            f"algorithm: {recipe.algorithm!r} in {args.recipe}, but `dllm-rl sft` trains SFT; run "
            f"`dllm-rl train {args.recipe}`, or set algorithm=sft"
        )
    from .runtime import shutdown
    from .trainers import trainer_class
    from .validate import validate_recipe

    validate_recipe(recipe)  # registry names, reward files, paths, keys the trainer would ignore
    trainer_class(recipe.algorithm)(recipe).train()
    shutdown()  # launched with several processes: close the process group cleanly


def cmd_generate(args) -> None:
    import torch

    from .config import RolloutConfig, apply_overrides, load_recipe, recipe_from_dict
    from .models.load import load_model
    from .policy import ORDERS, edit_head_for, order_head_for
    from .policy.edit_head import FILE as EDIT_FILE
    from .policy.order_head import FILE as ORDER_FILE
    from .rollout import generate
    from .rundir import resolve_model_dir
    from .validate import check_context, check_hub_model

    if not 0 <= args.seed < 2**63:  # torch.Generator.manual_seed's range (a negative seed wraps to another)
        raise ConfigError(f"--seed {args.seed}: give a seed from 0 to 2**63 - 1")
    model_dir = resolve_model_dir(args.checkpoint, key="CHECKPOINT")
    if not os.path.isdir(model_dir):
        check_hub_model(model_dir, "CHECKPOINT")
    recipe_file = os.path.join(model_dir, "recipe.yaml")
    if os.path.isfile(recipe_file):
        try:  # the saved recipe alone first: its own mistakes are not the overrides'
            load_recipe(recipe_file)
        except ConfigError as e:
            raise ConfigError(
                f"{recipe_file} (the recipe saved with CHECKPOINT): {e}; fix or delete that file (without it "
                f"generate decodes with the default rollout settings and the overrides)"
            ) from None
        recipe = load_recipe(recipe_file, args.overrides)
    else:  # a model without its recipe: the default decoding, with the overrides
        recipe = recipe_from_dict(apply_overrides({"rollout": {}}, list(args.overrides)))
    keys = [o.split("=", 1)[0].strip() for o in args.overrides]
    if stray := sorted({k for k in keys if not k.startswith(("rollout.", "model."))}):
        raise ConfigError(
            f"generate reads rollout.* and model.* settings only; {', '.join(stray)} would be ignored: drop them"
        )
    # CHECKPOINT is the model: model.path, a fresh LoRA (model.lora.*) and the tiny model's shape (model.tiny.*)
    # would be ignored; the settings of loading it (model.dtype, model.tokenizer, ...) are honoured
    if ignored := sorted(
        {k for k in keys if k.split(".")[:2] in (["model", "path"], ["model", "lora"], ["model", "tiny"])}
    ):
        raise ConfigError(
            f"{', '.join(ignored)} would be ignored: CHECKPOINT ({args.checkpoint}) is the model generate decodes "
            f"with; drop {', '.join(ignored)} (to decode with another model, give it as CHECKPOINT; a LoRA run's "
            f"checkpoint loads with its adapter)"
        )
    if empty := [i for i, p in enumerate(args.prompt) if not p.strip()]:
        raise ConfigError(f"--prompt number {empty[0] + 1} is empty; give the text to complete")
    check_context(recipe, model_dir, "CHECKPOINT")
    cfg: RolloutConfig = recipe.rollout
    # the learned heads a rollout setting needs, saved beside the model: checked before its weights load
    if ORDERS[cfg.order].needs_hidden and not os.path.isfile(os.path.join(model_dir, ORDER_FILE)):
        raise ConfigError(
            f"rollout.order=policy needs the order policy trained with the model, and CHECKPOINT ({model_dir}) "
            f"has no {ORDER_FILE}: give a checkpoint written by a GRPO run with rollout.order=policy, or pick "
            f"another rollout.order"
        )
    if cfg.edit != "none" and not os.path.isfile(os.path.join(model_dir, EDIT_FILE)):
        raise ConfigError(
            f"rollout.edit={cfg.edit} needs the edit head trained with the model, and CHECKPOINT ({model_dir}) has "
            f"no {EDIT_FILE}: give a checkpoint written by an edit SFT or GRPO run (recipes/tiny/*-edit-*.yaml), or "
            f"set rollout.edit=none"
        )
    model, tokenizer = load_model(recipe.model, path=model_dir)
    prompts = args.prompt if args.raw else [[{"role": "user", "content": p}] for p in args.prompt]
    out = generate(
        model,
        tokenizer,
        prompts,
        cfg,
        generator=torch.Generator().manual_seed(args.seed),
        order_policy=order_head_for(cfg.order, model, model_dir),
        edit_policy=edit_head_for(cfg, model, model_dir),
    )
    for prompt, completion in zip(args.prompt, out.completions):
        print(f"### prompt\n{prompt}\n### completion\n{completion}")


def cmd_eval(args) -> None:
    from .config import load_recipe
    from .evaluate import evaluate_recipe
    from .models.load import load_model
    from .policy import edit_head_for, order_head_for
    from .rundir import resolve_model_dir
    from .tasks import load_task
    from .validate import check_context, check_hub_model, validate_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if args.samples < 1:
        raise ConfigError(f"--samples {args.samples}: give at least 1 sample per prompt")
    validate_recipe(recipe, check_model=False, training=False)  # names and paths, before the model loads
    model_dir = resolve_model_dir(args.checkpoint, key="--checkpoint")
    if not os.path.isdir(model_dir):
        check_hub_model(model_dir, "--checkpoint")
    check_context(recipe, model_dir, "--checkpoint")
    task = load_task(recipe.data)
    model, tokenizer = load_model(recipe.model, path=args.checkpoint)
    order_policy = order_head_for(recipe.rollout.order, model, model_dir)
    edit_policy = edit_head_for(recipe.rollout, model, model_dir)
    trained = Path(model_dir) / "planner"  # a planner trained jointly with the model (GRPO's final/planner)
    if trained.is_dir():
        h = recipe.hybrid
        recipe = replace(recipe, hybrid=replace(h, planner=replace(h.planner, path=str(trained))))
        print(f"planner: {trained} (trained with this checkpoint), not {h.planner.path}")
    if args.hybrid_axes:
        from .axes import hybrid_axes, print_axes

        print_axes(hybrid_axes(model, tokenizer, task, recipe, samples=args.samples, order_policy=order_policy))
        return
    planner = None
    if recipe.hybrid.plan != "none" and recipe.hybrid.planner.path:
        from .models.ar import load_planner

        planner = load_planner(recipe.hybrid.planner, seed=recipe.train.seed, device=model.device)
    result = evaluate_recipe(
        model, tokenizer, task, recipe, order_policy=order_policy, edit_policy=edit_policy, planner=planner
    )
    for prompt, completion, value in result["examples"]:
        print(f"[{value:g}] {str(prompt[-1]['content'] if isinstance(prompt, list) else prompt)!r} -> {completion!r}")
    n = recipe.eval.num_samples
    how = passk = ""
    if n > 1:  # result["n"] counts samples; the accuracy is their mean, or the majority vote of each example's n
        how = f" (maj@{n})" if recipe.eval.majority else f" (the mean of {n} samples each)"
        passk = f"; pass@{n} {result[f'pass@{n}']:.4f}, maj@{n} {result[f'maj@{n}']:.4f}"
    # the accuracy counts solved samples (score >= 1.0): the mean score is shown where partial credit makes it differ
    partial = result["mean_score"] != sum(s >= 1.0 for s in result["scores"]) / result["n"]
    mean = f"; mean score {result['mean_score']:.4f} (partial credit counted)" if partial else ""
    print(f"accuracy {result['accuracy']:.4f} over {result['n'] // n} held-out {task.name} examples{how}{passk}{mean}")


def cmd_plan(args) -> None:
    from .config import load_recipe
    from .memory import print_plan
    from .validate import validate_recipe

    if args.prompt_length is not None and args.prompt_length < 1:
        raise ConfigError(f"--prompt-length {args.prompt_length}: give the prompt's token count (at least 1)")
    recipe = validate_recipe(
        load_recipe(args.recipe, args.overrides), check_model=False, check_data=False, training=False
    )
    print_plan(recipe, args.gpus, args.prompt_length, args.fused_logprobs)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may follow options (`generate CKPT --prompt X rollout.steps=8`): argparse leaves them over
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + extra
    show_tb = args.traceback or os.environ.get("DLLM_RL_TRACEBACK") == "1"
    try:
        if args.command in ("sft", "train"):
            cmd_train(args, force_sft=args.command == "sft")
        elif args.command == "generate":
            cmd_generate(args)
        elif args.command == "eval":
            cmd_eval(args)
        elif args.command == "plan":
            cmd_plan(args)
    except DllmRlError as e:
        if show_tb:  # the traceback, then the same one line and exit code as without it
            traceback.print_exc()
        print(f"dllm-rl: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
