"""Trains the model of modeling.py on the data of dataset.py; resumes bitwise with --resume.

    accelerate launch train.py                                   # the shipped sample task, CPU or GPU
    accelerate launch train.py --train_file my/train.jsonl --valid_file my/valid.jsonl --epochs 5
    accelerate launch train.py --resume model/last --epochs 8    # continue, or train further epochs
    accelerate launch --multi_gpu --num_processes 4 train.py ... # see README.md for more

Writes OUTDIR/best/ (best validation loss), OUTDIR/last/ (end of each epoch, every --save_steps)
and OUTDIR/log.json. This file is task-free: edit modeling.py and dataset.py, not the loop.
"""
import argparse
import inspect
import math
import os
import sys
from collections import defaultdict

import torch
import transformers
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import DistributedType, LoggerType, TorchDynamoPlugin, set_seed
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, get_scheduler

import dataset
import utils
from dataset import generate_dataset
from modeling import build_model, compute_metrics, format_samples, metric_inputs
from utils import UserError


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help keeps the description's layout and shows every option's default."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS):
            return action.help
        return f"{action.help or ''} (default: %(default)s)"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter,
                                     allow_abbrev=False)  # so that a misspelled option is an error
    parser.add_argument("--config", help="JSON or YAML file of option defaults, e.g. configs/tiny.yaml; flags override it")
    data = parser.add_argument_group("data")
    data.add_argument("--train_file", default="data/train.jsonl",
                      help=".jsonl .json .csv .tsv .parquet .txt, or a hub dataset name (see dataset.py)")
    data.add_argument("--valid_file", default="data/valid.jsonl", help="the data validated on after each epoch")
    data.add_argument("--dataset_config", help="a hub dataset's configuration, e.g. sst2 for --train_file nyu-mll/glue")
    data.add_argument("--train_split", default="train", help="the split of a hub dataset to train on")
    data.add_argument("--valid_split", default="validation", help="the split of a hub dataset to validate on")
    data.add_argument("--max_len", type=int, default=128, help="longer inputs are truncated (tokens)")
    data.add_argument("--group_by_length", action="store_true",
                      help="batches of similar length (less padding, faster); still random and resumable")
    data.add_argument("--num_workers", type=int, help="DataLoader worker processes (default: 2 with CUDA, else 0)")
    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", default="assets/tiny-bert",
                       help="hub id (bert-base-cased) or local directory; a directory with only a "
                            "config.json trains that architecture from scratch")
    model.add_argument("--freeze_backbone", action="store_true", help="train only the head (model.base_model frozen)")
    model.add_argument("--lora_r", type=int, default=0,
                       help="train LoRA adapters (PEFT) of this rank in the frozen backbone, and the head; 0 = off")
    model.add_argument("--lora_alpha", type=float, default=16, help="LoRA scaling")
    model.add_argument("--lora_dropout", type=float, default=0.05, help="dropout on the LoRA path")
    model.add_argument("--lora_target_modules",
                       help="comma-separated module names, e.g. query,value (default: every Linear of the backbone)")
    model.add_argument("--gradient_checkpointing", action="store_true", help="less memory, ~30%% more compute")
    model.add_argument("--torch_compile", action="store_true", help="torch.compile the model (slow start, faster steps)")
    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument("--epochs", type=int, default=5, help="may be raised on --resume to train further")
    optimisation.add_argument("--batch_size", type=int, default=32, help="per process; reduce if out of memory")
    optimisation.add_argument("--accumulation", type=int, default=1, help="batches per optimizer step")
    optimisation.add_argument("--lr", type=float, default=1e-3, help="peak learning rate; 2e-5 suits a pretrained BERT")
    optimisation.add_argument("--weight_decay", type=float, default=0.01, help="on matrices only, not biases/norms")
    optimisation.add_argument("--max_grad_norm", type=float, default=1.0, help="clip gradients to this norm; 0 = off")
    optimisation.add_argument("--lr_scheduler_type", default="linear", help="how the lr moves after warmup",
                              choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                       "constant_with_warmup"])
    optimisation.add_argument("--num_warmup_steps", type=int, default=0, help="optimizer steps of linear warmup")
    optimisation.add_argument("--skip_nonfinite", action="store_true",
                              help="skip optimizer steps whose gradients are NaN/inf (counted in log.json) "
                                   "instead of stopping")
    optimisation.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"],
                              help="default: what `accelerate config` / `accelerate launch` says")
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--metric_for_best", default="loss",
                            help="valid metric that decides best/: loss or a name compute_metrics() returns")
    evaluation.add_argument("--greater_is_better", action=argparse.BooleanOptionalAction,
                            help="for --metric_for_best (by default lower is better for names like loss, error, "
                                 "mse, mae, rmse, perplexity, higher for the others)")
    evaluation.add_argument("--early_stopping_patience", type=int, default=0,
                            help="stop after N epochs without a better --metric_for_best; 0 = off")
    evaluation.add_argument("--sample_every", type=int, default=0,
                            help="print --samples examples of the batch (input / prediction / gold) every N steps")
    evaluation.add_argument("--samples", type=int, default=3, help="examples shown each --sample_every")
    run = parser.add_argument_group("run")
    run.add_argument("--seed", type=int, default=42, help="initialisation, dropout and data order")
    run.add_argument("--outdir", default="model", help="where best/, last/ and log.json go")
    run.add_argument("--overwrite", action="store_true", help="replace a previous run in --outdir")
    run.add_argument("--resume", metavar="DIR", help="a checkpoint (model/last or model/best) to continue; "
                     "its my_config.json gives the defaults")
    run.add_argument("--ignore_mismatch", action="store_true",
                     help="resume even with another batch size, seed, model or number of processes")
    run.add_argument("--save_steps", type=int, default=0, help="also save last/ every N optimizer steps")
    run.add_argument("--stop_after_steps", type=int, default=0,
                     help="save last/ and stop after N optimizer steps in all; the schedule still spans "
                          "--epochs, so --resume continues as if never stopped (time-limited jobs)")
    run.add_argument("--log_every", type=int, default=10,
                     help="optimizer steps between loss displays and tracker logs (each one waits for the GPU)")
    run.add_argument("--report_to", choices=[t for t in LoggerType.list() if t != "all"],
                     help="also log to this tracker (tensorboard: OUTDIR/runs); pip install it first")
    return utils.parse_options(parser, argv)


def evaluate(accelerator, model, loader, desc):
    """Validation loss and metrics over the whole validation set, gathered from every process; the
    VALID bar ends showing them all."""
    model.eval()
    losses, gathered = [], defaultdict(list)
    bar = utils.progress(accelerator, None, desc, total=len(loader))  # updated by hand: it closes after the metrics
    with torch.no_grad():
        for batch in loader:
            outputs = model(**batch)
            batch_size = len(next(iter(batch.values())))
            losses.append(accelerator.gather_for_metrics(outputs.loss.detach().float().repeat(batch_size)))
            for key, value in metric_inputs(batch, outputs).items():
                gathered[key].append(accelerator.gather_for_metrics(value))
            bar.update()
    model.train()
    metrics = {"loss": torch.cat(losses).mean().item(),
               **compute_metrics({key: torch.cat(values) for key, values in gathered.items()})}
    bar.set_postfix(metrics)
    bar.close()
    return metrics


LOWER_IS_BETTER = {"loss", "error", "err", "mse", "mae", "rmse", "perplexity", "ppl", "wer", "cer"}


def check_first_batch(model, valid_set, args):
    """Before any training: one validation batch through the model, so that a forward without a
    scalar loss or a --metric_for_best that no metric has costs seconds, not an epoch. Returns
    whether a greater --metric_for_best is better. Changes nothing: eval mode, no gradients, RNG kept."""
    batch = valid_set.collate([valid_set[i] for i in range(min(2, len(valid_set)))])
    model.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        outputs = model(**batch)
        check_loss(model, batch, outputs)
        metrics = ["loss", *compute_metrics(metric_inputs(batch, outputs))]
    model.train()
    if args.metric_for_best not in metrics:
        raise UserError(f"--metric_for_best {args.metric_for_best}: not among the validation metrics "
                        f"({', '.join(metrics)}); compute_metrics() in modeling.py makes them.")
    greater = args.greater_is_better
    if greater is None:  # lower is better for losses, errors and perplexities
        greater = not LOWER_IS_BETTER & set(args.metric_for_best.lower().replace("-", "_").split("_"))
    return greater


def check_loss(model, batch, outputs):
    """One clear line for a forward() whose loss is missing or not a scalar."""
    loss = getattr(outputs, "loss", None)
    if loss is None:
        parameters = inspect.signature(type(getattr(model, "module", model)).forward).parameters  # DDP: .module
        swallowed = [k for k in batch if k not in parameters]
        hint = (f" The batch's keys {', '.join(swallowed)} are not parameters of forward() and went into its "
                f"**{next(p.name for p in parameters.values() if p.kind is p.VAR_KEYWORD)}: is one of them "
                f"meant as the labels?" if swallowed and any(p.kind is p.VAR_KEYWORD for p in parameters.values())
                else "")
        raise UserError(f"Model.forward() returned no loss: return a ModelOutput with .loss set (see modeling.py)."
                        + hint)
    if not torch.is_tensor(loss) or loss.dim() != 0:
        shape = tuple(loss.shape) if torch.is_tensor(loss) else type(loss).__name__
        raise UserError(f"Model.forward() returned a loss of shape {shape}: it must be a scalar tensor (reduce it, "
                        f"e.g. with .mean()).")


def resume_command(accelerator, outdir):
    """The full command that continues this run, launch options included."""
    launch = "accelerate launch"
    if accelerator.num_processes > 1:
        launch = f"accelerate launch --multi_gpu --num_processes {accelerator.num_processes}"
        if accelerator.num_processes > int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)):
            launch += " --num_machines N --machine_rank R --main_process_ip IP (as before)"
        if accelerator.device.type == "cpu":
            launch = f"ACCELERATE_USE_CPU=1 {launch}"
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        launch = "accelerate launch --config_file (the one this run used)"
    return f"{launch} train.py --resume {outdir}/last"


def main(argv=None):
    args = parse_args(argv)
    utils.check_outdir(args.outdir, args.resume, args.overwrite)
    transformers.utils.logging.disable_progress_bar()  # save_pretrained's bars would break ours
    accelerator = Accelerator(
        gradient_accumulation_steps=args.accumulation, mixed_precision=args.mixed_precision,
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if args.torch_compile else None,
        log_with=utils.tracker(args.report_to), project_dir=args.outdir,
        # The sampler's permutation is a function of (data_seed, epoch) only, so it can be replayed.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed))
    if args.resume and accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        # optimizer.pt holds the main process's shard of the optimizer state only: resuming from it
        # would train on with the other shards' moments reset, silently.
        raise UserError(f"--resume under {accelerator.distributed_type.value} is not supported yet: the checkpoint "
                        f"holds one shard of the optimizer state (its weights are whole: Model.from_pretrained "
                        f"loads them).")
    set_seed(args.seed, device_specific=True)

    with accelerator.main_process_first():  # the main process tokenizes, the others read its cache
        # The data side decides whether there is a tokenizer (or other processor); on --resume it is the checkpoint's.
        load_tokenizer = getattr(dataset, "load_tokenizer", lambda source, args: None)
        tokenizer = load_tokenizer(args.resume or args.model_name_or_path, args)
        train_set = generate_dataset(args.train_file, args.train_split, tokenizer, args)
        valid_set = generate_dataset(args.valid_file, args.valid_split, tokenizer, args, train_set.labels)
    model = build_model(args.model_name_or_path, train_set)
    if not isinstance(model, PreTrainedModel):
        raise UserError(f"build_model() in modeling.py returned a {type(model).__name__}, not a transformers "
                        f"PreTrainedModel, so its checkpoints could not be saved and loaded with save_pretrained "
                        f"/ from_pretrained. Subclass PreTrainedModel with a PretrainedConfig as config_class, as "
                        f"the default Model does.")
    greater_is_better = check_first_batch(model, valid_set, args)
    accelerator.print(f"best/ keeps the epoch with the {'highest' if greater_is_better else 'lowest'} valid "
                      f"{args.metric_for_best} (--{'no-' if greater_is_better else ''}greater_is_better to change it).")
    if args.resume:
        utils.load_weights(args.resume, model)
    if args.freeze_backbone:
        model.base_model.requires_grad_(False)
    if args.lora_r:
        utils.add_lora(model, args)
    if args.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise UserError(f"--gradient_checkpointing: {type(model).__name__} does not support it.")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.dim() >= 2]  # matrices and embeddings, not biases or norms
    no_decay = [p for p in trained if p.dim() < 2]
    # fused: one kernel per step, and it can skip a step with non-finite gradients without the host
    # looking at them (found_inf below), so the loop never waits for the GPU between logs.
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, fused=True)
    # Own generators: creating a loader's iterator then draws no number from the global RNG, whose
    # stream (dropout) must continue unchanged after a resume.
    num_workers = args.num_workers if args.num_workers is not None else 2 * torch.cuda.is_available()
    loader_options = {"num_workers": num_workers, "pin_memory": torch.cuda.is_available(),
                      "persistent_workers": num_workers > 0, "generator": torch.Generator()}
    if args.group_by_length:
        sampler = utils.LengthGroupedSampler(args.batch_size, train_set, args.seed)
        train_loader = DataLoader(train_set, args.batch_size, sampler=sampler, collate_fn=train_set.collate,
                                  **loader_options)
    else:
        train_loader = DataLoader(train_set, args.batch_size, shuffle=True, collate_fn=train_set.collate,
                                  **loader_options)
    valid_loader = DataLoader(valid_set, args.batch_size, collate_fn=valid_set.collate, **loader_options)
    model, optimizer, train_loader, valid_loader = accelerator.prepare(model, optimizer, train_loader, valid_loader)

    # A prepared scheduler steps once per process at each optimizer step, so it is sized in those
    # units; with the loader's length taken after prepare (per process), the schedule comes out the
    # same for any number of processes and any accumulation.
    steps_per_epoch = math.ceil(len(train_loader) / args.accumulation)
    scheduler = accelerator.prepare(get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=steps_per_epoch * args.epochs * accelerator.num_processes))

    if accelerator.is_main_process:
        utils.lock_outdir(args.outdir)  # one run per outdir, from here until this process ends
    state = utils.TrainState(num_processes=accelerator.num_processes)
    per_process = {"loss_sum": torch.zeros((), dtype=torch.float64), "batches": torch.zeros((), dtype=torch.int64)}
    if args.resume:
        state = utils.load_training_state(args.resume, accelerator, optimizer, scheduler, args.ignore_mismatch)
        per_process.update(utils.restore_rng(args.resume, accelerator))  # last: nothing may draw after it
    elif args.overwrite:
        utils.clear_outdir(accelerator, args.outdir)
    if args.report_to:
        accelerator.init_trackers("runs", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                  for k, v in vars(args).items()})
    # Sums kept on the device and read only every --log_every steps: reading one waits for the GPU.
    loss_sum, batches = (per_process["loss_sum"].to(accelerator.device), per_process["batches"].to(accelerator.device))
    window = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss sum, batches, non-finite steps

    def save(names):
        utils.save_checkpoint(accelerator, args.outdir, names, model, tokenizer, optimizer, scheduler, args, state,
                              {"loss_sum": loss_sum.cpu(), "batches": batches.cpu()})

    def log_window(epoch, bar):
        """Shows and logs the mean loss since the last call; stops on non-finite gradients."""
        loss, count, nonfinite = window.tolist()
        window.zero_()
        if nonfinite and not args.skip_nonfinite:
            raise UserError(f"non-finite gradients in {int(nonfinite)} of the optimizer steps up to step "
                            f"{state.global_step} (epoch {epoch}); no update was made with them. Lower --lr, check "
                            f"the data, or pass --skip_nonfinite to skip such steps.")
        state.skipped_steps += int(nonfinite)
        if count:
            values = {"loss": loss / count, "lr": scheduler.get_last_lr()[0]}
            bar.set_postfix(values, refresh=False)
            accelerator.log({f"train/{k}": v for k, v in values.items()}, step=state.global_step)

    model.train()  # from_pretrained() returns a model in eval mode (dropout off)
    stopped = preempted = False
    preemption = utils.Preemption()  # SIGTERM / SIGUSR1: finish the step, save last/, exit
    for epoch in range(state.epoch, args.epochs):
        if args.early_stopping_patience and state.bad_epochs >= args.early_stopping_patience:
            accelerator.print(f"Early stopping: valid {args.metric_for_best} has not improved on {state.best_metric:.4f} "
                              f"for {state.bad_epochs} epochs (--early_stopping_patience {args.early_stopping_patience}).")
            break
        state.epoch = epoch
        train_loader.set_epoch(epoch)
        skipped = state.steps_done_in_epoch * args.accumulation
        batches_left = accelerator.skip_first_batches(train_loader, skipped) if skipped else train_loader
        bar = utils.progress(accelerator, batches_left, f"[Epoch {epoch}] [TRAIN]", initial=skipped,
                             total=len(train_loader))
        for batch in bar:
            with accelerator.accumulate(model):
                outputs = model(**batch)
                check_loss(model, batch, outputs)  # attributes only: no wait for the GPU
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients:
                    # After backward() every process holds the same (all-reduced) gradients, so all of
                    # them skip the same steps. fp16's scaler does this itself.
                    grad_norm = accelerator.clip_grad_norm_(trained, args.max_grad_norm or math.inf)
                    nonfinite = ~torch.isfinite(grad_norm)
                    if accelerator.scaler is None:
                        optimizer.optimizer.found_inf = nonfinite.float()  # fused AdamW: no update if 1
                        window[2] += nonfinite
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
            loss = outputs.loss.detach()
            finite = torch.isfinite(loss)
            loss_sum += torch.where(finite, loss, 0.0)
            batches += finite
            window[0] += torch.where(finite, loss, 0.0)
            window[1] += finite
            if not accelerator.sync_gradients:
                continue
            state.global_step += 1
            state.steps_done_in_epoch += 1
            end_of_epoch = accelerator.gradient_state.end_of_dataloader
            if args.sample_every and state.global_step % args.sample_every == 0 and accelerator.is_main_process:
                # In eval mode, without gradients, and with the RNG streams restored afterwards: showing
                # samples (even with generate()) changes nothing in the run.
                unwrapped = accelerator.unwrap_model(model).eval()
                cuda = [accelerator.device] if accelerator.device.type == "cuda" else []
                with torch.no_grad(), torch.random.fork_rng(devices=cuda):
                    samples = format_samples(unwrapped, tokenizer, batch, outputs, args.samples)
                unwrapped.train()
                bar.write(f"--- samples at step {state.global_step}:\n" + "\n".join(samples[:args.samples]))
            saving = (args.save_steps and state.global_step % args.save_steps == 0
                      or state.global_step == args.stop_after_steps)
            if state.global_step % args.log_every == 0 or end_of_epoch or saving:
                log_window(epoch, bar)  # before any save: nothing is saved after an unnoticed NaN
                preempted = preemption.received(accelerator)
            stopped = state.global_step == args.stop_after_steps or preempted
            if end_of_epoch:
                continue  # the end-of-epoch save below serves --save_steps and --stop_after_steps too
            if stopped or saving:
                save(["last"])
            if stopped:
                break
        bar.close()
        if state.steps_done_in_epoch < steps_per_epoch:  # stopped mid-epoch; last/ holds the position
            break

        valid_log = evaluate(accelerator, model, valid_loader, f"[Epoch {epoch}] [VALID]")
        totals = accelerator.reduce(torch.stack([loss_sum, batches.to(loss_sum.dtype)]), reduction="sum")
        train_log = {"loss": (totals[0] / totals[1]).item(), "lr": scheduler.get_last_lr()[0]}
        if args.skip_nonfinite:
            train_log["skipped_steps"], state.skipped_steps = state.skipped_steps, 0
        state.log[f"Epoch {epoch}"] = {"train_log": train_log, "valid_log": valid_log}
        accelerator.log({f"valid/{k}": v for k, v in valid_log.items()}, step=state.global_step)
        loss_sum.zero_()
        batches.zero_()
        value = valid_log[args.metric_for_best]
        improved = state.best_metric is None or (value > state.best_metric if greater_is_better
                                                 else value < state.best_metric)
        state.best_metric = value if improved else state.best_metric
        state.bad_epochs = 0 if improved else state.bad_epochs + 1
        state.epoch, state.steps_done_in_epoch = epoch + 1, 0
        save(["last", "best"] if improved else ["last"])
        accelerator.print(f"[Epoch {epoch}] train loss {train_log['loss']:.4f}, "
                          + ", ".join(f"valid {k} {v:.4f}" for k, v in valid_log.items())
                          + (" (best so far: saved best/)" if improved else ""))
        if stopped:
            break
    if stopped:
        reason = f"signal {preempted}" if preempted else "--stop_after_steps"
        accelerator.print(f"Stopped by {reason} after {state.global_step} optimizer steps; {args.outdir}/last holds "
                          f"the full state. Continue with: {resume_command(accelerator, args.outdir)}")
    accelerator.end_training()
    status = 128 + preempted if preempted else 0  # as if killed by the signal, so a scheduler sees a preemption
    if accelerator.num_processes > 1:
        # Everything is saved and fsynced. Skipping interpreter shutdown avoids a rare hang in the
        # process-group threads at exit (seen about 1 in 30 two-process CPU runs with gloo).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
