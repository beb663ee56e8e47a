"""`tvq train`: tokenizer (unless given), then the model, with resumable checkpoints."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from tvq.config import ModelConfig as Arch
from tvq.corpus import DEFAULT_VAL_FRACTION, DEFAULT_VOCAB_SIZE
from tvq.distributed.cluster import active as cluster_active
from tvq.train.settings import TrainSettings as Run
from tvqcli.app import (
    CLUSTER_OPTIONS,
    AlgorithmOption,
    BytesOption,
    CoordinatorOption,
    DevicesOption,
    DistributedOption,
    DtypeOption,
    NumProcessesOption,
    ProcessIdOption,
    SkipBadLinesOption,
    TextFieldOption,
    TokenizerFileOption,
    ValFractionOption,
    ValOption,
    app,
    check_output_dir,
    fail,
    finite,
    handle_errors,
    join_cluster,
    stderr,
)
from tvqcli.prepare_output import PrepareProgress
from tvqcli.recipe import (
    ConfigOption,
    DryRunOption,
    print_plan,
    recipe_text,
    resolved,
)

# Architecture fields and training settings passed through to the library; their defaults
# are the library's (tvq/config.py, tvq/train/settings.py).
ARCH_FIELDS = ("d_model", "d_k", "d_v", "n_head", "n_code", "n_layer", "mem_len", "agg_cache",
               "e_scale")  # fmt: skip
# The run's recipe (docs/DESIGN.md section 11): its bad values are usage errors (exit 2).
RECIPE_FIELDS = ("schedule", "decay_fraction", "min_lr", "ema", "export", "eval_tokens", "keep")
RUN_FIELDS = ("steps", "batch_size", "update_len", "block_len", "lr", "warmup", "weight_decay",
              "grad_clip", "c_beta", "c_gamma", "p_dropemb", "p_dropres", "p_droplyr", "seed",
              "eval_every", "save_every", "grad_accum", "remat", *RECIPE_FIELDS)  # fmt: skip


# tvq train's own options too long to declare on one line of its signature.
TextsArgument = Annotated[
    list[Path],
    typer.Argument(help="Text or JSONL files (.gz too) or directories of them, or one "
                   "dataset made by tvq prepare."),
]  # fmt: skip
VocabSizeOption = Annotated[int, typer.Option(help="Vocabulary of a new tokenizer.")]
NLayerOption = Annotated[int, typer.Option(help="Layers (two attention sublayers each).")]
AggCacheOption = Annotated[bool, typer.Option(help="Aggregate cache of older tokens.")]
FromOption = Annotated[
    Path | None, typer.Option("--from", help="Fine-tune this model (architecture and tokenizer).")
]
DropLayerOption = Annotated[
    float, typer.Option(help="Layer drop: a whole sublayer, per sequence and step.",
                        callback=finite),
]  # fmt: skip
GradAccumOption = Annotated[
    int, typer.Option(help="Run each batch as N micro-batches (less memory, same update).")
]
RematOption = Annotated[
    bool, typer.Option("--remat", help="Recompute each layer in the backward pass "
                       "(gradient checkpointing: less memory, same gradients)."),
]  # fmt: skip
VerboseOption = Annotated[
    bool, typer.Option("--verbose", "-v", help="Print the compiled step's memory.")
]
ShardParamsOption = Annotated[
    bool, typer.Option(help="Split parameters and optimizer state over the devices (FSDP).")
]
ScheduleOption = Annotated[
    str, typer.Option(help="Learning rate after the warm-up: cosine, linear, constant or wsd "
                      "(warmup-stable-decay)."),
]  # fmt: skip
DecayFractionOption = Annotated[
    float, typer.Option(help="wsd: the last fraction of the steps that decays.", callback=finite)
]
MinLrOption = Annotated[
    float | None, typer.Option(help="The floor the decay reaches.", show_default="0.1 × lr",
                               callback=finite),
]  # fmt: skip
EmaOption = Annotated[
    float | None, typer.Option(help="Keep an exponential moving average of the parameters "
                               "with this decay, e.g. 0.999: evaluated and exported.",
                               callback=finite),
]  # fmt: skip
ExportOption = Annotated[
    str, typer.Option(help="With --ema, the model written: ema, or last (the parameters).")
]
EvalTokensOption = Annotated[
    int | None, typer.Option(help="Bound each evaluation to N held-out tokens (the same "
                             "documents every time).", show_default="every document"),
]  # fmt: skip
KeepOption = Annotated[
    str, typer.Option(help="Checkpoints kept: best (lowest held-out bits/byte, exported; and "
                      "the latest), last, or N latest."),
]  # fmt: skip
LogDirOption = Annotated[
    Path | None, typer.Option(help="Write TensorBoard event files here (pip install tensorboardX).")
]
WandbOption = Annotated[
    str | None, typer.Option("--wandb", help="Log to this Weights & Biases project "
                             "(pip install wandb; WANDB_MODE=offline works offline)."),
]  # fmt: skip
EScaleOption = Annotated[
    float | None,
    typer.Option(help="Output logit scale.", show_default="d_model^-1/2", callback=finite),
]


def _number(help: str) -> Any:
    """A float option that must be finite."""
    return typer.Option(help=help, callback=finite)


@app.command()
@handle_errors
def train(
    ctx: typer.Context,
    texts: TextsArgument,
    out: Annotated[Path, typer.Option("--out", "-o", help="Model directory to write.")],
    tokenizer: TokenizerFileOption = None,
    use_bytes: BytesOption = False,
    vocab_size: VocabSizeOption = DEFAULT_VOCAB_SIZE,
    from_dir: FromOption = None,
    val: ValOption = None,
    val_fraction: ValFractionOption = DEFAULT_VAL_FRACTION,
    d_model: Annotated[int, typer.Option(help="Model width.")] = Arch.d_model,
    d_k: Annotated[int, typer.Option(help="Key width per head.")] = Arch.d_k,
    d_v: Annotated[int, typer.Option(help="Value width per head.")] = Arch.d_v,
    n_head: Annotated[int, typer.Option(help="Heads.")] = Arch.n_head,
    n_code: Annotated[int, typer.Option(help="Codewords per head.")] = Arch.n_code,
    n_layer: NLayerOption = Arch.n_layer,
    mem_len: Annotated[int, typer.Option(help="Window memory M.")] = Arch.mem_len,
    agg_cache: AggCacheOption = Arch.agg_cache,
    e_scale: EScaleOption = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = Run.steps,
    batch_size: Annotated[int, typer.Option(help="Sequences per step (global).")] = Run.batch_size,
    update_len: Annotated[int, typer.Option(help="Tokens per sequence per step.")] = Run.update_len,
    block_len: Annotated[int, typer.Option(help="Block length L.")] = Run.block_len,
    lr: Annotated[float, _number("Peak learning rate.")] = Run.lr,
    warmup: Annotated[int, typer.Option(help="Linear warm-up steps.")] = Run.warmup,
    weight_decay: Annotated[float, _number("Decoupled weight decay.")] = Run.weight_decay,
    grad_clip: Annotated[float, _number("Gradient clipping norm.")] = Run.grad_clip,
    c_beta: Annotated[float, _number("Commitment loss weight.")] = Run.c_beta,
    c_gamma: Annotated[float, _number("Codebook EMA rate.")] = Run.c_gamma,
    p_dropemb: Annotated[float, _number("Dropout of the token embeddings.")] = Run.p_dropemb,
    p_dropres: Annotated[float, _number("Dropout of each sublayer's residual.")] = Run.p_dropres,
    p_droplyr: DropLayerOption = Run.p_droplyr,
    seed: Annotated[int, typer.Option(help="Random seed.")] = Run.seed,
    eval_every: Annotated[int, typer.Option(help="Steps between evaluations.")] = Run.eval_every,
    save_every: Annotated[int, typer.Option(help="Steps between checkpoints.")] = Run.save_every,
    grad_accum: GradAccumOption = Run.grad_accum,
    remat: RematOption = Run.remat,
    schedule: ScheduleOption = Run.schedule,
    decay_fraction: DecayFractionOption = Run.decay_fraction,
    min_lr: MinLrOption = Run.min_lr,
    ema: EmaOption = Run.ema,
    export: ExportOption = Run.export,
    eval_tokens: EvalTokensOption = Run.eval_tokens,
    keep: KeepOption = Run.keep,
    log_dir: LogDirOption = None,
    wandb: WandbOption = None,
    verbose: VerboseOption = False,
    config: ConfigOption = None,
    dry_run: DryRunOption = False,
    name: Annotated[str, typer.Option(help="Corpus name for the metadata.")] = "",
    text_field: TextFieldOption = "text",
    skip_bad_lines: SkipBadLinesOption = False,
    devices: DevicesOption = None,
    shard_params: ShardParamsOption = False,
    algorithm: AlgorithmOption = None,
    dtype: DtypeOption = None,
    coordinator: CoordinatorOption = None,
    num_processes: NumProcessesOption = None,
    process_id: ProcessIdOption = None,
    distributed: DistributedOption = None,
) -> None:
    """Train a model on text files; run the same command again to resume.

    The text is tokenized once into shards in the cache ($TVQ_CACHE_DIR/data,
    else ~/.cache/tvq/data) that later runs read; or give a dataset made by
    tvq prepare. Data parallel over every device (--devices to use fewer); with
    --coordinator (or --distributed auto) over several processes or hosts,
    each running this command."""
    from tvq.distributed import cluster
    from tvq.train import train_from_files

    check_output_dir(out, "--out")
    _check_recipe(ctx.params)
    _check_prepared_options(ctx, texts)
    join_cluster(coordinator, num_processes, process_id, distributed)
    if cluster_active():  # Gloo announces its connections on stdout; train prints none
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    values, quiet = ctx.params, not cluster.is_main()  # process 0 reports for the cluster
    recipe = recipe_text(resolved(ctx), full_command(ctx))
    if verbose and not quiet:
        print(recipe, end="", file=sys.stderr)
    with (
        PrepareProgress(quiet) as on_prepare,
        _progress(quiet or dry_run, _where(devices)) as report,
    ):
        model = train_from_files(
            texts=texts, out=out, tokenizer_path=tokenizer, use_bytes=use_bytes,
            vocab_size=vocab_size, from_dir=from_dir, held_out=val or [],
            val_fraction=val_fraction,
            architecture={name: values[name] for name in ARCH_FIELDS},
            settings={name: values[name] for name in RUN_FIELDS},
            corpus_name=name, command=full_command(ctx), on_progress=report, devices=devices,
            shard_params=shard_params, algorithm=algorithm and algorithm.value,
            dtype=dtype and dtype.value, text_field=text_field, skip_bad_lines=skip_bad_lines,
            on_prepare=on_prepare, on_memory=_print_memory if verbose and not quiet else None,
            log_dir=log_dir, wandb_project=wandb, dry_run=dry_run, recipe=recipe,
        )  # fmt: skip
    if dry_run:
        if not quiet:
            print_plan(model)
    elif not quiet:
        _print_saved(out, model.metadata)


def _check_recipe(values: dict[str, Any]) -> None:
    """A usage error (exit 2) for a bad value of the recipe's options, or a log whose
    package is missing (exit 1), before any data is prepared."""
    from tvq.errors import TrainingError
    from tvq.train.logs import check_loggers
    from tvq.train.settings import check_recipe

    try:
        check_recipe(Run(lr=values["lr"], **{name: values[name] for name in RECIPE_FIELDS}))
    except TrainingError as e:
        name, rest = (str(e).split(" ", 1) + [""])[:2]
        if name in RECIPE_FIELDS:  # the message names the option
            name = f"--{name.replace('_', '-')}"
        raise fail(f"{name} {rest}", 2) from None
    check_loggers(values["log_dir"], values["wandb"])


def _check_prepared_options(ctx: typer.Context, texts: list[Path]) -> None:
    """A usage error for an option that a prepared dataset among texts has fixed."""
    from tvq.corpus import is_prepared

    if any(p.is_dir() and is_prepared(p) for p in texts):
        fixed = [f"--{n.replace('_', '-')}" for n in DATA_FIXED if _given(ctx, n)]
        if fixed:
            raise fail(f"{fixed[0].replace('--use-bytes', '--bytes')} does not go with a "
                       "prepared dataset: its tokenizer and held-out documents were chosen by "
                       "tvq prepare", 2)  # fmt: skip


def _where(devices: int | None) -> str:
    """The line that says what the run trains on, printed once it has started."""
    from tvq.distributed.devices import data_mesh, describe

    seen, used = describe(), data_mesh(devices).size
    processes = f" in {seen['processes']} processes" if seen["processes"] > 1 else ""
    return f"training on {used} {seen['backend']} device{'s' if used > 1 else ''}{processes}"


def _print_saved(out: Path, meta: dict) -> None:
    """The run's last line on stderr: where the model is, after how many steps, and its
    held-out figures."""
    line = f"saved {out} after {meta.get('steps')} steps"
    if "heldout_bits_per_byte" in meta:
        line += (
            f": held-out loss {meta['heldout_loss']:.4f} nats/token, "
            f"{meta['heldout_bits_per_byte']:.4f} bits/byte"
        )
    stderr.print(line, highlight=False)


def _print_memory(sizes: dict[str, int] | None) -> None:
    """tvq train -v: the compiled step's memory, one line on stderr."""
    if sizes is None:
        stderr.print("compiled step memory: not reported by this backend", highlight=False)
        return
    mb = {name: size / 2**20 for name, size in sizes.items()}
    stderr.print(
        f"compiled step memory: {mb['total']:.1f} MiB per device (arguments "
        f"{mb['arguments']:.1f}, outputs {mb['outputs']:.1f}, temporaries "
        f"{mb['temporaries']:.1f}, reused inputs {mb['aliased']:.1f})", highlight=False,
    )  # fmt: skip


# Options a prepared dataset has fixed (tvq prepare chose them).
DATA_FIXED = ("tokenizer", "use_bytes", "vocab_size", "val", "val_fraction", "text_field",
              "skip_bad_lines")  # fmt: skip


def _given(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)  # Typer's own copy of click's enum: by name
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def full_command(ctx: typer.Context) -> str:
    """The command with every setting spelled out, so the metadata can rebuild the model."""
    from typer.core import TyperArgument

    words = ["tvq", ctx.info_name or "train"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or param.name == "help" or param.name in CLUSTER_OPTIONS:
            continue
        if isinstance(param, TyperArgument):
            words += [str(v) for v in value]
            continue
        flag = max(param.opts, key=len)
        if param.is_flag:
            if param.secondary_opts:
                words.append(flag if value else max(param.secondary_opts, key=len))
            elif value:
                words.append(flag)
            continue
        for item in value if isinstance(value, list | tuple) else [value]:
            words += [flag, str(item)]
    return " ".join(shlex.quote(w) for w in words)


class _progress:
    """A Rich progress bar on stderr (plain lines when stderr is not a terminal), shown
    from the first step on (the data's preparation has its own before it)."""

    def __init__(self, quiet: bool = False, where: str = "") -> None:
        self.quiet, self.where = quiet, where

    def __enter__(self):
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.live = stderr.is_terminal and not self.quiet
        self.bar = Progress(
            TextColumn("step {task.completed}/{task.total}"),
            BarColumn(),
            TextColumn("loss {task.fields[loss]:.3f}  {task.fields[speed]:.0f} tok/s"),
            TimeRemainingColumn(),
            console=stderr,
            disable=not self.live,
        )
        self.task = None
        return self.report

    def report(self, progress) -> None:
        if self.quiet:
            return
        if progress.resumed_from is not None:
            self.bar.console.print(f"resuming from step {progress.resumed_from}", highlight=False)
        if self.task is None:
            if self.where:  # once the run has started: errors before it stay one line
                self.bar.console.print(self.where, highlight=False)
            self.bar.start()
            self.task = self.bar.add_task(
                "train", total=progress.steps, completed=progress.step - 1, loss=0.0, speed=0.0
            )
        self.bar.update(
            self.task, completed=progress.step, loss=progress.loss,
            speed=progress.tokens_per_second,
        )  # fmt: skip
        if progress.eval is not None:
            ev = progress.eval
            self.bar.console.print(
                f"step {progress.step}: held-out loss {ev['loss']:.4f}, "
                f"{ev['bits_per_byte']:.4f} bits/byte",
                highlight=False,
            )
        elif not self.live and progress.step % 10 == 0:
            stderr.print(
                f"step {progress.step}/{progress.steps} loss {progress.loss:.4f} "
                f"{progress.tokens_per_second:.0f} tok/s",
                highlight=False,
            )

    def __exit__(self, *exc):
        self.bar.stop()
        return False
