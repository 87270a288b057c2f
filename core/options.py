"""What options exist, and where each value comes from: the table of every option (--help), and
the order a run takes its values in (defaults < the resumed checkpoint's my_config.json < a --config
file < the command line), each checked by type and range."""

import argparse
import json
import math
import os
import sys
from pathlib import Path

import yaml
from accelerate.utils import LoggerType

from core import resume
from core.checkpoint import find
from utils import UserError


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's layout and shows every option's default."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return f"{action.help or ''} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a misspelled option or a bad value as one line (not the whole usage) and no
    abbreviations (--lr_s would silently mean --lr_scheduler_type)."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message):
        raise UserError(f"{message} ({self.prog} --help lists the options)")


# ---------------------------------------------------------------- the table


def parse_args(argv=None, description=None):
    """train.py's options, grouped as --help shows them."""
    parser = ArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.add_argument(
        "--config",
        help="JSON or YAML file of option defaults, e.g. configs/tiny.yaml; flags override it",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--train_file",
        default="data/train.jsonl",
        help=".jsonl .json .csv .tsv .parquet .txt, or a hub dataset name (see dataset.py)",
    )
    data.add_argument(
        "--valid_file", default="data/valid.jsonl", help="the data validated on after each epoch"
    )
    data.add_argument(
        "--dataset_config",
        help="a hub dataset's configuration, e.g. sst2 for --train_file nyu-mll/glue",
    )
    data.add_argument(
        "--train_split", default="train", help="the split of a hub dataset to train on"
    )
    data.add_argument(
        "--valid_split", default="validation", help="the split of a hub dataset to validate on"
    )
    data.add_argument(
        "--max_len", type=number(int, 1), default=128, help="longer inputs are truncated (tokens)"
    )
    data.add_argument(
        "--group_by_length",
        action="store_true",
        help="batches of similar length (less padding, faster); still random and resumable",
    )
    data.add_argument(
        "--num_workers",
        type=number(int, 0),
        help="DataLoader worker processes (default: 2 with CUDA, else 0)",
    )
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model_name_or_path",
        default="assets/tiny-bert",
        help="hub id (bert-base-cased) or local directory; a directory with only a "
        "config.json trains that architecture from scratch",
    )
    model.add_argument(
        "--freeze_backbone",
        action="store_true",
        help="train only the head (model.base_model frozen)",
    )
    model.add_argument(
        "--lora_r",
        type=number(int, 0),
        default=0,
        help="train LoRA adapters (PEFT) of this rank in the frozen backbone, and the head; "
        "0 = off",
    )
    model.add_argument("--lora_alpha", type=number(float, 0), default=16, help="LoRA scaling")
    model.add_argument(
        "--lora_dropout",
        type=number(float, 0, below=1),
        default=0.05,
        help="dropout on the LoRA path",
    )
    model.add_argument(
        "--lora_target_modules",
        help="comma-separated module names, e.g. query,value (default: every Linear of the "
        "backbone)",
    )
    model.add_argument(
        "--gradient_checkpointing", action="store_true", help="less memory, ~30%% more compute"
    )
    model.add_argument(
        "--torch_compile",
        action="store_true",
        help="torch.compile the model (slow start, faster steps)",
    )
    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument(
        "--epochs",
        type=number(int, 1),
        default=5,
        help="may be raised on --resume to train further",
    )
    optimisation.add_argument(
        "--max_steps",
        type=number(int, 0),
        default=0,
        help="the run's length in optimizer steps instead of --epochs (epochs run as the data "
        "gives them; the LR schedule spans exactly N steps; may be raised on --resume); 0 = off",
    )
    optimisation.add_argument(
        "--batch_size", type=number(int, 1), default=32, help="per process; reduce if out of memory"
    )
    optimisation.add_argument(
        "--accumulation", type=number(int, 1), default=1, help="batches per optimizer step"
    )
    optimisation.add_argument(
        "--lr",
        type=number(float, 0),
        default=1e-3,
        help="peak learning rate; 2e-5 suits a pretrained BERT",
    )
    optimisation.add_argument(
        "--weight_decay",
        type=number(float, 0),
        default=0.01,
        help="on matrices only, not biases/norms",
    )
    optimisation.add_argument(
        "--max_grad_norm",
        type=number(float, 0),
        default=1.0,
        help="clip gradients to this norm; 0 = off",
    )
    optimisation.add_argument(
        "--lr_scheduler_type",
        default="linear",
        help="how the lr moves after warmup",
        choices=[
            "linear",
            "cosine",
            "cosine_with_restarts",
            "polynomial",
            "constant",
            "constant_with_warmup",
        ],
    )
    optimisation.add_argument(
        "--num_warmup_steps",
        type=number(int, 0),
        default=0,
        help="optimizer steps of linear warmup",
    )
    optimisation.add_argument(
        "--skip_nonfinite",
        action="store_true",
        help="skip optimizer steps whose gradients are NaN/inf (counted in log.json) "
        "instead of stopping",
    )
    optimisation.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        help="default: what `accelerate config` / `accelerate launch` says",
    )
    optimisation.add_argument(
        "--ema_decay",
        type=number(float, 0, below=1),
        default=0,
        help="keep an exponential moving average of the weights (0.999 is usual), which validation "
        "runs and best/ is chosen by; saved as ema.pt, used by predict.py; 0 = off",
    )
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument(
        "--eval_steps",
        type=number(int, 0),
        default=0,
        help="validate every N optimizer steps (and at the last one) instead of at the end of "
        "each epoch; best/ and early stopping then count validations; 0 = each epoch",
    )
    evaluation.add_argument(
        "--metric_for_best",
        default="loss",
        help="valid metric that decides best/: loss or a name compute_metrics() returns",
    )
    evaluation.add_argument(
        "--greater_is_better",
        action=argparse.BooleanOptionalAction,
        help="for --metric_for_best (by default lower is better for names like loss, error, "
        "mse, mae, rmse, perplexity, higher for the others)",
    )
    evaluation.add_argument(
        "--early_stopping_patience",
        type=number(int, 0),
        default=0,
        help="stop after N validations without a better --metric_for_best; 0 = off",
    )
    evaluation.add_argument(
        "--sample_every",
        type=number(int, 0),
        default=0,
        help="print --samples examples of the batch (input / prediction / gold) every N steps",
    )
    evaluation.add_argument(
        "--samples", type=number(int, 1), default=3, help="examples shown each --sample_every"
    )
    run = parser.add_argument_group("run")
    run.add_argument(
        "--check",
        action="store_true",
        help="check modeling.py and dataset.py on this data in seconds (PASS / WARN / FAIL), "
        "then exit; writes nothing",
    )
    run.add_argument(
        "--seed", type=number(int, 0), default=42, help="initialisation, dropout and data order"
    )
    run.add_argument("--outdir", default="model", help="where best/, last/ and log.json go")
    run.add_argument("--overwrite", action="store_true", help="replace a previous run in --outdir")
    run.add_argument(
        "--resume",
        metavar="DIR",
        help="a checkpoint (model/last or model/best) to continue; "
        "its my_config.json gives the defaults. auto: OUTDIR/last if there is one, else a new "
        "run (the same command continues after a requeue or a restart)",
    )
    run.add_argument(
        "--ignore_mismatch",
        action="store_true",
        help="resume even with another batch size, seed, model or number of processes",
    )
    run.add_argument(
        "--save_steps",
        type=number(int, 0),
        default=0,
        help="also save last/ every N optimizer steps",
    )
    run.add_argument(
        "--stop_after_steps",
        type=number(int, 0),
        default=0,
        help="save last/ and stop after N optimizer steps in all; the schedule still spans "
        "--epochs (or --max_steps), so --resume continues as if never stopped (time-limited jobs)",
    )
    run.add_argument(
        "--log_every",
        type=number(int, 1),
        default=10,
        help="optimizer steps between loss displays and tracker logs (each one waits for the GPU)",
    )
    run.add_argument(
        "--report_to",
        choices=[t for t in LoggerType.list() if t != "all"],
        help="also log to this tracker (tensorboard: OUTDIR/runs); pip install it first",
    )
    return parse_options(parser, argv)


# ---------------------------------------------------------------- where the values come from


def number(kind, minimum, below=None):
    """An argparse type: a finite int or float >= minimum (and < below); the same check for values
    from a --config file or a checkpoint's my_config.json (see parse_options)."""

    def convert(text):
        value = kind(text)
        if not math.isfinite(value) or value < minimum or (below is not None and value >= below):
            bounds = f">= {minimum}" + (f" and < {below}" if below is not None else "")
            raise argparse.ArgumentTypeError(
                f"{text} is not a {'whole ' if kind is int else ''}number {bounds}"
            )
        return value

    convert.__name__ = kind.__name__  # argparse names it in "invalid int value"
    return convert


def read_options_file(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such options file.")
    try:
        with open(path) as f:
            values = yaml.safe_load(f) if path.suffix in (".yaml", ".yml") else json.load(f)
    except yaml.YAMLError as e:
        where = f"line {e.problem_mark.line + 1}: " if getattr(e, "problem_mark", None) else ""
        raise UserError(
            f"{path}: not valid YAML ({where}{getattr(e, 'problem', None) or e})."
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}).") from None
    if not isinstance(values, dict):
        raise UserError(f"{path}: expected a mapping of option names to values.")
    return values


def resume_auto(parser, argv):
    """--resume auto: the same command with --resume OUTDIR/last if --outdir holds a checkpoint,
    else a new run (resume.auto_checkpoint() says which)."""
    fresh = parse_options(parser, [*argv, "--resume", ""])  # the last --resume counts: none
    fresh.resume, last = None, resume.auto_checkpoint(fresh.outdir)
    return parse_options(parser, [*argv, "--resume", str(last)]) if last else fresh


def read_config(path, including=()):
    """{option: (value, the file it came from)} of a --config file, after those it includes: a
    `config: base.yaml` key (relative to the including file's folder) is read first, and the file's
    own values override it. A file that includes itself, or one that includes it, is refused."""
    path = Path(path)
    chain = [*including, path.resolve()]
    if path.resolve() in including:
        raise UserError(
            f"{path}: includes itself ({' -> '.join(map(str, chain))}). Remove the `config:` "
            f"key that closes the loop."
        )
    values = read_options_file(path)
    base = values.pop("config", None)
    merged = {}
    if base is not None:
        if not isinstance(base, str):
            raise UserError(f"{path}: config: {base!r} is not the path of an options file.")
        if not (path.parent / base).is_file():
            raise UserError(
                f"{path}: config: {base}: no such options file ({path.parent / base}; a path "
                f"relative to {path.parent})."
            )
        merged = read_config(path.parent / base, chain)
    merged.update({key: (value, str(path)) for key, value in values.items()})
    return merged


def check_value(action, value, source):
    """A value from a file, held to what the option takes on the command line: its type, range and
    choices."""

    def refuse(expected):
        raise UserError(f"{source}: {action.dest}: {value!r} is not {expected}.")

    if value is None and action.default is None:
        return
    if isinstance(
        action,
        (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction),
    ):
        if not isinstance(value, bool):
            refuse("true or false")
    elif isinstance(value, bool) or not isinstance(value, (int, float, str)):
        refuse("a " + (action.type.__name__ if action.type else "string"))
    elif action.type is not None:
        if isinstance(value, str) or (action.type.__name__ == "int" and not isinstance(value, int)):
            refuse(f"a number ({action.type.__name__})")
        try:
            action.type(str(value))
        except argparse.ArgumentTypeError as e:
            raise UserError(f"{source}: {action.dest}: {e}.") from None
    elif not isinstance(value, str):
        refuse("a string")
    if action.choices is not None and value not in action.choices:
        refuse(f"one of {', '.join(map(str, action.choices))}")


def parse_options(parser, argv=None):
    """Defaults < the resumed checkpoint's my_config.json < --config FILE < flags on the command
    line."""
    known, _ = parser.parse_known_args(argv)
    if known.resume is None and known.config:  # `resume:` in an options file: as the flag is
        in_file = read_config(known.config).get("resume", (None,))[0]
        if in_file is not None:
            argv = sys.argv[1:] if argv is None else list(argv)
            return parse_options(parser, [*argv, "--resume", str(in_file)])
    if known.resume and known.overwrite:  # one continues the run in --outdir, one replaces it
        raise UserError(
            f"--resume {known.resume} and --overwrite together: --resume continues the run in "
            f"--outdir, --overwrite starts a new one in its place. Give one of them."
        )
    if known.resume == "auto":
        return resume_auto(parser, sys.argv[1:] if argv is None else list(argv))
    defaults, saved = {}, {}
    if known.resume:
        # Or .old-<name>, where a crash between the two renames of a save left it.
        folder = find(known.resume)
        if not (folder / "my_config.json").is_file():
            raise UserError(
                f"--resume {known.resume}: not a checkpoint of this template (no my_config.json). "
                f"Give a checkpoint directory such as model/last."
            )
        saved = read_options_file(folder / "my_config.json")
        defaults.update({k: v for k, v in saved.items() if k not in resume.NOT_RESUMED})
    sources = {key: f"{known.resume}/my_config.json" for key in defaults}
    if known.config:
        for key, (value, source) in read_config(known.config).items():
            defaults[key], sources[key] = value, source
    actions = {action.dest: action for action in parser._actions}
    for key, value in defaults.items():
        source = sources[key]
        if key not in actions:
            parser.error(f"{source}: unknown option '{key}'")
        check_value(actions[key], value, source)
    if saved:
        defaults.setdefault("outdir", str(Path(known.resume).parent))  # the checkpoint's folder
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    resume.compare_options(saved, args, known.resume)
    if os.path.exists(args.outdir) and not os.path.isdir(args.outdir):  # False for a path too long
        raise UserError(
            f"--outdir {args.outdir} is a file; give a folder (it is created if missing)."
        )
    return args
