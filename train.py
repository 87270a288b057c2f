"""Trains the model of modeling.py on the data of dataset.py; resumes bitwise with --resume.

    accelerate launch train.py                                 # the shipped sample task, CPU or GPU
    accelerate launch train.py --train_file my/train.jsonl --valid_file my/valid.jsonl --epochs 5
    accelerate launch train.py --resume model/last --epochs 8  # continue, or train further epochs
    accelerate launch --multi_gpu --num_processes 4 train.py   # see README.md for more

Writes OUTDIR/best/ (best validation loss), OUTDIR/last/ (end of each epoch, every --save_steps)
and OUTDIR/log.json. This file is task-free: edit modeling.py and dataset.py, not the loop.
"""

import contextlib
import gc
import itertools
import math
import os
from collections import defaultdict

gc.disable()  # the imports make ~700,000 objects (~1 s of collections); kept for good below
import torch
import transformers
from accelerate import Accelerator
from accelerate.scheduler import AcceleratedScheduler
from accelerate.utils import DistributedType, TorchDynamoPlugin, set_seed
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, get_scheduler

import dataset
import modeling
from core import check, checkpoint, lora, options, processes, resume, step
from dataset import generate_dataset
from modeling import build_model
from utils import UserError, datasets_cache_space

gc.freeze()  # what the imports made lives as long as the process: never walk it again
gc.enable()


def main(argv=None):
    args = options.parse_args(argv, __doc__)
    accelerator, resumed, threads = setup(args)
    done = resumed and resume.finished(resumed, args)
    if done:  # run again as it was (--resume auto): nothing to do
        accelerator.print(
            f"{args.resume}: the run is finished ({done[0]}); nothing to do. {done[1]}"
        )
        return processes.finish(accelerator, 0)
    with accelerator.main_process_first():  # the main process tokenizes, the others read its cache
        tokenizer, train_set, valid_set, data = load_data(args)
    check.check_collate(train_set, tokenizer, args)
    if resumed:
        resume.check_data(resumed.data, data, args.resume, args.ignore_mismatch)
    model = build(args, train_set)
    check.check_positions(model, args)
    if args.check:  # a few seconds of checks on the two user files instead of the run
        checked = (model, tokenizer, train_set, valid_set, args, modeling, generate_dataset)
        failed = check.run(accelerator, *checked)
        return processes.finish(accelerator, failed)
    adapt(model, args)
    model, optimizer, scheduler, train_loader, valid_loader = prepare(
        accelerator, args, model, train_set, valid_set
    )
    # On the device, as validation will run it (a metric that generates costs what it costs there).
    unwrapped = accelerator.unwrap_model(model)
    greater = check.first_batch(
        unwrapped, tokenizer, train_set, valid_set, args, modeling, accelerator.device
    )
    accelerator.print(
        f"best/ keeps the epoch with the {'highest' if greater else 'lowest'} valid "
        f"{args.metric_for_best} (--{'no-' if greater else ''}greater_is_better to change it)."
    )

    # Everything a checkpoint saves besides the weights and the position: {name: an object with
    # state_dict() / load_state_dict()}, saved as optimizer.pt, lr.bin, NAME.pt and restored
    # bitwise. step.optimizer_step() steps every optimizer here (each skips a non-finite step),
    # every LR scheduler, and updates every AveragedModel (--ema_decay's) from the model's weights.
    # Under FSDP2 each process saves its shard of an optimizer; any other object is the main
    # process's, so one that holds sharded tensors is refused (check.objects_under_fsdp).
    objects = {"optimizer": optimizer, "scheduler": scheduler}
    if accelerator.scaler is not None and accelerator.scaler.is_enabled():  # --mixed_precision fp16
        objects["scaler"] = accelerator.scaler  # its loss scale: a resumed run continues with it
    check.objects_under_fsdp(accelerator, objects, args.ema_decay)
    if args.ema_decay:  # validated and deciding best/ in the model's place; saved as ema.pt
        objects["ema"] = AveragedModel(unwrapped, multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay))

    if accelerator.is_main_process:
        resume.lock_outdir(args.outdir)  # one run per outdir, from here until this process ends
    if resumed:  # the position read in setup() is still the checkpoint's, now that none can save
        resume.check_unchanged(accelerator, args.resume, resumed)
    state = resumed or checkpoint.TrainState(num_processes=accelerator.num_processes)
    if resumed:  # the weights, the objects, the position, and the RNG streams last
        resume.restore(args.resume, accelerator, model, objects, state)
        if state.threads and state.threads != threads and accelerator.device.type == "cpu":
            accelerator.print(
                f"changed on resume: {state.threads} -> {threads} CPU threads per "
                f"process; float sums come in another order, so the continuation is "
                f"close to, not bitwise, the run it continues."
            )
    state.data, state.threads = data, threads
    state.distributed_type = accelerator.distributed_type.value
    if args.report_to:
        config = {
            k: v if isinstance(v, (int, float, str, bool)) else str(v)
            for k, v in vars(args).items()
        }
        accelerator.init_trackers("runs", config=config)

    try:
        stop = train(
            accelerator, args, model, tokenizer, objects, train_loader, valid_loader, state, greater
        )
    except RuntimeError as e:  # a collective that failed: said in one line, not gloo's traceback
        if accelerator.num_processes > 1 and processes.peer_stopped(e):
            processes.exit_peer_stopped(accelerator, args.outdir)
        raise
    if stop:
        accelerator.print(
            f"Stopped by {f'signal {stop}' if isinstance(stop, int) else stop} after "
            f"{state.global_step} optimizer steps; {args.outdir}/last holds the full "
            f"state. Continue with: {processes.resume_command(accelerator, args.outdir)}"
        )
    # A signal's exit status (128 + its number): a scheduler sees a preemption.
    processes.finish(accelerator, 128 + stop if isinstance(stop, int) else 0)


def setup(args):
    """The refusals that need no model, the Accelerator, the resumed run's position (or None)."""
    check.refuse_folders_with_code(args)
    # The resumed run's position, read once (from .old-last if a crash left it there: verify() below
    # takes that back).
    resumed = checkpoint.read_state(checkpoint.find(args.resume)) if args.resume else None
    if not args.check:
        resume.check_outdir(args.outdir, args.resume, resumed, args.overwrite)
    transformers.utils.logging.disable_progress_bar()  # save_pretrained's bars would break ours
    if resumed:  # on another number of processes: the same global batch, by --accumulation
        args.accumulation = resume.elastic_accumulation(
            args.resume,
            resumed.num_processes,
            args.accumulation,
            int(os.environ.get("WORLD_SIZE", 1)),
            args.ignore_mismatch,
        )
    processes.join_restarted_group()  # after a restart by torchrun's agent only
    # No gradient_accumulation_steps: the loop accumulates --accumulation batches itself, weighing
    # each by its items (accelerate would divide every batch's loss by the same number).
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if args.torch_compile else None,
        log_with=step.tracker(args.report_to),
        project_dir=args.outdir,
        kwargs_handlers=processes.deepspeed_handlers(),
    )
    processes.refuse_lone_processes(accelerator)
    processes.shard_fsdp_on_cpu(accelerator)
    processes.check_deepspeed(accelerator, args, resumed)
    processes.refuse_fp16_on_cpu(accelerator)
    if args.resume:
        if accelerator.is_main_process:
            checkpoint.verify(args.resume)  # every file against its manifest, before any is read
        accelerator.wait_for_everyone()
    threads = processes.cpu_threads(accelerator)
    if accelerator.device.type == "cpu":
        accelerator.print(
            f"{threads} CPU thread(s) per process (OMP_NUM_THREADS=N before the command to choose)."
        )
    check.check_hooks(modeling)
    if args.sample_every and not hasattr(modeling, "format_samples"):
        raise UserError(
            "--sample_every: modeling.py has no format_samples(model, tokenizer, batch, "
            "outputs, k)."
        )
    if not has_metrics():
        accelerator.print(
            "modeling.py has no metric_inputs() and compute_metrics(): validation "
            "reports the loss only."
        )
    set_seed(args.seed, device_specific=True)
    return accelerator, resumed, threads


def load_data(args):
    """dataset.py's tokenizer (the checkpoint's on --resume) and datasets, and what the data was."""
    # The data side decides whether there is a tokenizer (or other processor).
    load_tokenizer = getattr(dataset, "load_tokenizer", lambda source, args: None)
    with datasets_cache_space():  # a full disk there: one line, no partial file left
        tokenizer = load_tokenizer(args.resume or args.model_name_or_path, args)
        train_set = generate_dataset(args.train_file, args.train_split, tokenizer, args)
        valid_set = generate_dataset(
            args.valid_file, args.valid_split, tokenizer, args, getattr(train_set, "labels", None)
        )
    data = {
        "train": resume.describe_data(
            args.train_file, args.train_split, args.dataset_config, len(train_set)
        ),
        "valid": resume.describe_data(
            args.valid_file, args.valid_split, args.dataset_config, len(valid_set)
        ),
    }
    return tokenizer, train_set, valid_set, data


def build(args, train_set):
    """modeling.py's model, checked to be one that save_pretrained / from_pretrained can keep."""
    model = build_model(args.model_name_or_path, train_set)
    if not isinstance(model, PreTrainedModel):
        raise UserError(
            f"build_model() in modeling.py returned a {type(model).__name__}, not a "
            f"transformers PreTrainedModel, so its checkpoints could not be saved and loaded "
            f"with save_pretrained / from_pretrained. Subclass PreTrainedModel with a "
            f"PretrainedConfig as config_class, as the default Model does."
        )
    return model


def adapt(model, args):
    """What the options change in the model before it trains: backbone frozen, LoRA,
    checkpointing."""
    if args.freeze_backbone:
        model.base_model.requires_grad_(False)
    if args.lora_r:
        lora.add_lora(model, args)
    if args.gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        try:  # transformers 5.23 renamed it (the old name is gone in 6)
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        except ValueError:  # "... does not support activation checkpointing"
            raise UserError(
                f"--gradient_checkpointing: {type(model).__name__} does not support it."
            ) from None


def prepare(accelerator, args, model, train_set, valid_set):
    """The optimizer, the loaders and the scheduler, prepared with the model by accelerate."""
    trained = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trained if p.dim() >= 2]  # matrices and embeddings, not biases or norms
    no_decay = [p for p in trained if p.dim() < 2]
    # fused: one kernel per step, and it skips a step with non-finite gradients without the host
    # looking at them (step.optimizer_step), so the loop never waits for the GPU between logs.
    groups = [
        {"params": decay, "weight_decay": args.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, fused=True)
    # Own generators: creating a loader's iterator then draws no number from the global RNG, whose
    # stream (dropout) must continue unchanged after a resume.
    gpu = torch.cuda.is_available()
    workers = 2 * gpu if args.num_workers is None else args.num_workers
    loader_options = {
        "num_workers": workers,
        "pin_memory": gpu,
        "persistent_workers": workers > 0,
        "generator": torch.Generator(),
    }
    step_batch = args.batch_size * args.accumulation * accelerator.num_processes  # grouped per step
    sampler = (
        resume.LengthGroupedSampler(step_batch, train_set, args.seed)
        if args.group_by_length
        else resume.ShuffledSampler(len(train_set), args.seed)
    )
    train_loader = DataLoader(
        train_set,
        args.batch_size,
        sampler=sampler,  # collate None: torch's own
        collate_fn=getattr(train_set, "collate", None),
        **loader_options,
    )
    valid_loader = DataLoader(
        valid_set, args.batch_size, collate_fn=getattr(valid_set, "collate", None), **loader_options
    )
    model, optimizer, train_loader, valid_loader = accelerator.prepare(
        model, optimizer, train_loader, valid_loader
    )
    # A prepared scheduler steps once per process at each optimizer step, so it is sized in those
    # units; with the loader's length taken after prepare (per process), the schedule comes out the
    # same for any number of processes and any accumulation.
    steps_per_epoch = math.ceil(len(train_loader) / args.accumulation)
    processes = accelerator.num_processes
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer,
        num_warmup_steps=args.num_warmup_steps * processes,
        num_training_steps=(args.max_steps or steps_per_epoch * args.epochs) * processes,
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # accelerate wraps a scheduler only when it is prepared with the model there: by hand
        scheduler = AcceleratedScheduler(scheduler, optimizer)
    else:
        scheduler = accelerator.prepare(scheduler)
    return model, optimizer, scheduler, train_loader, valid_loader


def train(accelerator, args, model, tokenizer, objects, train_loader, valid_loader, state, greater):
    """The loop, from `state`'s position to the run's last step (--max_steps, else --epochs of
    steps) or a stop; every validation and every save is made here. Returns why it stopped before
    the end: a signal number, "--stop_after_steps", or None. `greater`: whether a greater
    --metric_for_best is better."""
    steps_per_epoch = math.ceil(len(train_loader) / args.accumulation)
    last_step = args.max_steps or steps_per_epoch * args.epochs
    loss_items = getattr(modeling, "loss_items", None)  # what the loss is a mean over (optional)
    # Taken after prepare(): FSDP2 replaces every parameter by a sharded one (a DTensor), and the
    # old ones would never see a gradient (nothing clipped, no NaN noticed).
    trained = [p for p in model.parameters() if p.requires_grad]
    # What validation runs, and so what decides best/: the EMA of the weights, or the model itself.
    validated = objects["ema"].module if "ema" in objects else model
    replacing = args.overwrite and not args.resume  # the previous run goes with our 1st checkpoint
    # The loss sums of each process, as saved: log.json's means come out bitwise the same.
    running, first_step = step.RunningLoss(accelerator, state.loss_sums), state.global_step
    model.train()  # from_pretrained() returns a model in eval mode (dropout off)
    # SIGTERM / SIGUSR1 / Ctrl-C: the step in progress finishes, last/ is saved, the run ends.
    preemption = processes.Preemption(args.outdir)
    stop = ended = None
    for epoch in itertools.count(state.epoch):
        state.epoch = epoch
        train_loader.set_epoch(epoch)
        done = state.steps_done_in_epoch * args.accumulation  # this epoch's batches before a resume
        batches = accelerator.skip_first_batches(train_loader, done) if done else train_loader
        bar = train_bar(accelerator, epoch, done, len(train_loader))
        # One optimizer step a window of --accumulation batches. Its items are counted first, so
        # that every token weighs the same however the step's batch is split (see loss_divisors).
        for window in step.windows(batches, args.accumulation):
            divisors, items = step.loss_divisors(window, loss_items, args.accumulation, accelerator)
            for i, batch in enumerate(window):
                # The gradients are all-reduced once a step, in the window's last backward.
                last = i == len(window) - 1
                with contextlib.nullcontext() if last else step.no_sync(accelerator, model):
                    outputs = step.forward(model, batch)
                    check.loss_of(model, batch, outputs)  # attributes only: no wait for the GPU
                    step.backward(accelerator, model, outputs.loss / divisors[i], last)
                running.add(outputs.loss.detach(), items[i], batch, loss_items is not None)
                bar.update()  # by hand: it closes before validation
            grad_norm = step.clip(accelerator, trained, args.max_grad_norm)
            # After backward() every process holds the same (all-reduced) gradients, so all of
            # them skip the same steps.
            running.nonfinite_steps += step.optimizer_step(
                objects, grad_norm, accelerator.scaler, model
            )

            # One optimizer step done: show, validate, close the epoch, save, stop.
            state.global_step += 1
            state.steps_done_in_epoch += 1
            end_of_epoch = state.steps_done_in_epoch == steps_per_epoch
            end_of_run = state.global_step == last_step
            if args.sample_every and state.global_step % args.sample_every == 0:
                show = (model, tokenizer, batch, outputs, args.samples, state.global_step, bar)
                step.show_samples(accelerator, modeling.format_samples, *show)
            if state.global_step == args.stop_after_steps:
                stop = "--stop_after_steps"
            every = args.eval_steps and state.global_step % args.eval_steps == 0
            validate = end_of_run or (every if args.eval_steps else end_of_epoch)
            periodic = args.save_steps and state.global_step % args.save_steps == 0
            save = end_of_epoch or end_of_run or validate or periodic or stop
            # A signal: asked after every step in one process (a flag), every --log_every steps in
            # several (a collective: the same answer on every process).
            if accelerator.num_processes == 1 or save or state.global_step % args.log_every == 0:
                stop = stop or preemption.received(accelerator) or None
            if save or stop or state.global_step % args.log_every == 0:  # before any save
                log_steps(accelerator, args, running, state, objects["scheduler"], bar, end_of_run)
            improved, train_loss = False, None
            if end_of_epoch or validate:
                bar.close()
            if end_of_epoch:
                train_loss = close_epoch(accelerator, args, running, state, objects["scheduler"])
            if validate:
                improved, ended = validation(
                    accelerator,
                    args,
                    validated,
                    tokenizer,
                    valid_loader,
                    state,
                    greater,
                    train_loss,
                )
                stop = stop or preemption.received(accelerator) or None  # one that came meanwhile
                if not (end_of_epoch or end_of_run or stop or ended):  # the epoch goes on
                    done = state.steps_done_in_epoch * args.accumulation
                    bar = train_bar(accelerator, epoch, done, len(train_loader))
            if end_of_epoch:  # where a resume continues: the next epoch
                state.epoch, state.steps_done_in_epoch = state.epoch + 1, 0
            # The periodic save, the validation's, the epoch's and the final one are this one.
            if save or stop or ended:
                state.loss_sums = running.per_process()
                names = ["last", "best"] if improved else ["last"]
                saved = (model, tokenizer, objects, args, state, replacing)
                checkpoint.save(accelerator, args.outdir, names, *saved)
                replacing = False
            if stop or ended or end_of_run:
                break
        bar.close()
        if stop or ended or state.global_step >= last_step:
            break
    preemption.close()
    accelerator.print(running.summary(state.global_step - first_step))
    return stop


def train_bar(accelerator, epoch, done, total):
    """The TRAIN bar of an epoch, from its `done` batches (after a resume or a validation)."""
    return step.progress(accelerator, None, f"[Epoch {epoch}] [TRAIN]", initial=done, total=total)


def log_steps(accelerator, args, running, state, scheduler, bar, end_of_run):
    """Every --log_every steps and at the run's last: the loss and throughput since the last log, on
    the bar, the tracker and in log.json ("Step N"). At every save as well: refuses to go on (before
    the save: nothing is saved after a non-finite step that went unnoticed) if a step had non-finite
    gradients and --skip_nonfinite is off."""
    nonfinite = running.nonfinite()
    if nonfinite and not args.skip_nonfinite:
        raise UserError(
            f"non-finite gradients in {nonfinite} of the optimizer steps up to step "
            f"{state.global_step} (epoch {state.epoch}); no update was made with them. "
            f"Lower --lr, check the data, or pass --skip_nonfinite to skip such steps."
        )
    state.skipped_steps += nonfinite
    if state.global_step % args.log_every and not end_of_run:
        return
    loss, samples, tokens = running.since_log()
    values = {"loss": loss, "lr": scheduler.get_last_lr()[0], "samples_per_second": samples,
              "tokens_per_second": tokens}  # fmt: skip
    values = {k: v for k, v in values.items() if v is not None}
    names = {
        "loss": "loss",
        "lr": "lr",
        "samples_per_second": "samples/s",
        "tokens_per_second": "tokens/s",
    }
    bar.set_postfix({names[k]: v for k, v in values.items()}, refresh=False)
    state.log.setdefault(f"Step {state.global_step}", {})["train_log"] = values
    accelerator.log({f"train/{k}": v for k, v in values.items()}, step=state.global_step)


def validation(accelerator, args, model, tokenizer, valid_loader, state, greater, train_loss):
    """Validation, into log.json ("Epoch N" at an epoch's end without --eval_steps, as ever, else
    "Step N"), the tracker and one printed line (with the epoch's `train_loss` at its end). Returns
    (whether --metric_for_best improved, so best/ is saved; whether early stopping ends the run)."""
    at_epoch = train_loss is not None and not args.eval_steps
    name = f"Epoch {state.epoch}" if at_epoch else f"Step {state.global_step}"
    valid_log = evaluate(accelerator, model, tokenizer, valid_loader, f"[{name}] [VALID]")
    state.log.setdefault(name, {})["valid_log"] = valid_log
    accelerator.log({f"valid/{k}": v for k, v in valid_log.items()}, step=state.global_step)
    value = valid_log[args.metric_for_best]
    improved = not math.isnan(value) and (
        state.best_metric is None
        or (value > state.best_metric if greater else value < state.best_metric)
    )
    state.best_metric = value if improved else state.best_metric
    state.bad_epochs = 0 if improved else state.bad_epochs + 1  # validations without improvement
    accelerator.print(
        f"[{name}] "
        + (f"train loss {train_loss:.4f}, " if at_epoch else "")
        + ", ".join(f"valid {k} {v:.4f}" for k, v in valid_log.items())
        + (" (best so far: saved best/)" if improved else "")
    )
    return improved, stopping(accelerator, args, state)


def stopping(accelerator, args, state):
    """Whether early stopping ends the run: --early_stopping_patience validations without a
    better --metric_for_best (said in one line)."""
    patience = args.early_stopping_patience
    if not (patience and state.bad_epochs >= patience):
        return False
    accelerator.print(
        f"Early stopping: valid {args.metric_for_best} has not improved on "
        f"{state.best_metric:.4f} for {state.bad_epochs} validations "
        f"(--early_stopping_patience {patience})."
    )
    return True


def close_epoch(accelerator, args, running, state, scheduler):
    """The end of an epoch: its mean training loss into log.json's "Epoch N" (said in one line
    when validation is by --eval_steps), and the next epoch's sums started. Returns the loss."""
    train_log = {"loss": running.epoch_mean(), "lr": scheduler.get_last_lr()[0]}
    if args.skip_nonfinite:
        train_log["skipped_steps"], state.skipped_steps = state.skipped_steps, 0
    state.log[f"Epoch {state.epoch}"] = {"train_log": train_log}
    if args.eval_steps:
        accelerator.print(f"[Epoch {state.epoch}] train loss {train_log['loss']:.4f}")
    return train_log["loss"]


def has_metrics():
    """Whether modeling.py has the optional metric_inputs() and compute_metrics() (else: loss
    only)."""
    return hasattr(modeling, "metric_inputs") and hasattr(modeling, "compute_metrics")


def metrics_of(model, tokenizer, batch, outputs):
    """modeling.metric_inputs(model, tokenizer, batch, outputs): per-example tensors to gather from
    every process. `model` is the unwrapped model in eval mode (it may generate)."""
    return modeling.metric_inputs(model, tokenizer, batch, outputs) if has_metrics() else {}


def compute_metrics(gathered):
    """modeling.compute_metrics(gathered): {name: value} over the whole validation set."""
    return modeling.compute_metrics(gathered) if has_metrics() else {}


def evaluate(accelerator, model, tokenizer, loader, desc):
    """Validation loss (a mean over items, as the training loss) and metrics over the whole
    validation set, gathered from every process; the VALID bar ends showing them all. Every
    process runs metric_inputs() on its share (generation too); torch's RNG streams are restored
    afterwards (a sampling generate() draws from them)."""
    loss_items = getattr(modeling, "loss_items", None)
    model.eval()
    unwrapped = accelerator.unwrap_model(model)  # what metric_inputs() may call generate() on
    losses, items, gathered = [], [], defaultdict(list)
    # Updated by hand: it closes after the metrics.
    bar = step.progress(accelerator, None, desc, total=len(loader))
    cuda = [accelerator.device] if accelerator.device.type == "cuda" else []
    # autocast: a model that accelerate did not prepare (an EMA) runs in --mixed_precision too.
    with torch.no_grad(), torch.random.fork_rng(devices=cuda), accelerator.autocast():
        for batch in loader:
            outputs = step.forward(model, batch)
            # Per example (gather_for_metrics drops the copies that even out the last batches): its
            # items (tokens, with modeling.loss_items; else 1), and the batch's loss times them. An
            # example without items weighs 0, as in training (a batch of none has a NaN mean loss).
            per_example = (
                loss_items(batch).float()
                if loss_items
                else torch.ones(len(next(iter(batch.values()))), device=accelerator.device)
            )
            weighted = torch.where(per_example > 0, outputs.loss.detach().float() * per_example, 0)
            losses.append(accelerator.gather_for_metrics(weighted))
            items.append(accelerator.gather_for_metrics(per_example))
            for key, value in metrics_of(unwrapped, tokenizer, batch, outputs).items():
                gathered[key].append(accelerator.gather_for_metrics(value))
            bar.update()
    model.train()
    total = torch.cat(items).sum()
    if total == 0:
        accelerator.print(
            f"{desc}: no example of the validation set has a loss item (loss_items() in "
            f"modeling.py gives 0 for every one: are all its labels -100?), so the valid loss is "
            f"NaN and never decides best/. Check dataset.py's labels for --valid_file."
        )
    metrics = {
        "loss": (torch.cat(losses).sum() / total).item(),
        **compute_metrics({key: torch.cat(values) for key, values in gathered.items()}),
    }
    bar.set_postfix(metrics)
    bar.close()
    return metrics


if __name__ == "__main__":
    main()
