"""Trains the model of modeling.py on the data of dataset.py; resumes bitwise with --resume.

    accelerate launch train.py                                   # the shipped sample task, CPU or GPU
    accelerate launch train.py --train_file my/train.jsonl --valid_file my/valid.jsonl --epochs 5
    accelerate launch train.py --resume model/last --epochs 8    # continue, or train further epochs
    accelerate launch --multi_gpu --num_processes 4 train.py ... # see README.md for more

Writes OUTDIR/best/ (best validation loss), OUTDIR/last/ (end of each epoch, every --save_steps)
and OUTDIR/log.json. This file is task-free: edit modeling.py and dataset.py, not the loop.
"""
import argparse
import gc
import math
import os
import sys
from collections import defaultdict
from pathlib import Path

gc.disable()  # torch and transformers make ~700,000 objects while importing, which the collector walks again and again
try:
    import torch
    import transformers
    from torch.distributed.tensor import DTensor
    from accelerate import Accelerator, DataLoaderConfiguration, PartialState
    from accelerate.utils import (DistributedType, FullyShardedDataParallelPlugin, LoggerType, TorchDynamoPlugin,
                                   set_seed)
    from torch.utils.data import DataLoader
    from transformers import PreTrainedModel, get_scheduler

    import check
    import checkpoint
    import dataset
    import modeling
    import utils
    from dataset import generate_dataset
    from modeling import build_model
    from utils import UserError
finally:  # (~1 s of start-up); what the imports made lives as long as the process: never collect it
    gc.freeze()
    gc.enable()


def parse_args(argv=None):
    parser = utils.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    parser.add_argument("--config", help="JSON or YAML file of option defaults, e.g. configs/tiny.yaml; flags override it")
    data = parser.add_argument_group("data")
    data.add_argument("--train_file", default="data/train.jsonl",
                      help=".jsonl .json .csv .tsv .parquet .txt, or a hub dataset name (see dataset.py)")
    data.add_argument("--valid_file", default="data/valid.jsonl", help="the data validated on after each epoch")
    data.add_argument("--dataset_config", help="a hub dataset's configuration, e.g. sst2 for --train_file nyu-mll/glue")
    data.add_argument("--train_split", default="train", help="the split of a hub dataset to train on")
    data.add_argument("--valid_split", default="validation", help="the split of a hub dataset to validate on")
    data.add_argument("--max_len", type=utils.number(int, 1), default=128, help="longer inputs are truncated (tokens)")
    data.add_argument("--group_by_length", action="store_true",
                      help="batches of similar length (less padding, faster); still random and resumable")
    data.add_argument("--num_workers", type=utils.number(int, 0), help="DataLoader worker processes (default: 2 with CUDA, else 0)")
    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", default="assets/tiny-bert",
                       help="hub id (bert-base-cased) or local directory; a directory with only a "
                            "config.json trains that architecture from scratch")
    model.add_argument("--freeze_backbone", action="store_true", help="train only the head (model.base_model frozen)")
    model.add_argument("--lora_r", type=utils.number(int, 0), default=0,
                       help="train LoRA adapters (PEFT) of this rank in the frozen backbone, and the head; 0 = off")
    model.add_argument("--lora_alpha", type=utils.number(float, 0), default=16, help="LoRA scaling")
    model.add_argument("--lora_dropout", type=utils.number(float, 0, below=1), default=0.05, help="dropout on the LoRA path")
    model.add_argument("--lora_target_modules",
                       help="comma-separated module names, e.g. query,value (default: every Linear of the backbone)")
    model.add_argument("--gradient_checkpointing", action="store_true", help="less memory, ~30%% more compute")
    model.add_argument("--torch_compile", action="store_true", help="torch.compile the model (slow start, faster steps)")
    optimisation = parser.add_argument_group("optimisation")
    optimisation.add_argument("--epochs", type=utils.number(int, 1), default=5, help="may be raised on --resume to train further")
    optimisation.add_argument("--batch_size", type=utils.number(int, 1), default=32, help="per process; reduce if out of memory")
    optimisation.add_argument("--accumulation", type=utils.number(int, 1), default=1, help="batches per optimizer step")
    optimisation.add_argument("--lr", type=utils.number(float, 0), default=1e-3, help="peak learning rate; 2e-5 suits a pretrained BERT")
    optimisation.add_argument("--weight_decay", type=utils.number(float, 0), default=0.01, help="on matrices only, not biases/norms")
    optimisation.add_argument("--max_grad_norm", type=utils.number(float, 0), default=1.0, help="clip gradients to this norm; 0 = off")
    optimisation.add_argument("--lr_scheduler_type", default="linear", help="how the lr moves after warmup",
                              choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                       "constant_with_warmup"])
    optimisation.add_argument("--num_warmup_steps", type=utils.number(int, 0), default=0, help="optimizer steps of linear warmup")
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
    evaluation.add_argument("--early_stopping_patience", type=utils.number(int, 0), default=0,
                            help="stop after N epochs without a better --metric_for_best; 0 = off")
    evaluation.add_argument("--sample_every", type=utils.number(int, 0), default=0,
                            help="print --samples examples of the batch (input / prediction / gold) every N steps")
    evaluation.add_argument("--samples", type=utils.number(int, 1), default=3, help="examples shown each --sample_every")
    run = parser.add_argument_group("run")
    run.add_argument("--check", action="store_true",
                     help="check modeling.py and dataset.py on this data in seconds (PASS / WARN / FAIL), then exit; "
                          "writes nothing")
    run.add_argument("--seed", type=utils.number(int, 0), default=42, help="initialisation, dropout and data order")
    run.add_argument("--outdir", default="model", help="where best/, last/ and log.json go")
    run.add_argument("--overwrite", action="store_true", help="replace a previous run in --outdir")
    run.add_argument("--resume", metavar="DIR", help="a checkpoint (model/last or model/best) to continue; "
                     "its my_config.json gives the defaults")
    run.add_argument("--ignore_mismatch", action="store_true",
                     help="resume even with another batch size, seed, model or number of processes")
    run.add_argument("--save_steps", type=utils.number(int, 0), default=0, help="also save last/ every N optimizer steps")
    run.add_argument("--stop_after_steps", type=utils.number(int, 0), default=0,
                     help="save last/ and stop after N optimizer steps in all; the schedule still spans "
                          "--epochs, so --resume continues as if never stopped (time-limited jobs)")
    run.add_argument("--log_every", type=utils.number(int, 1), default=10,
                     help="optimizer steps between loss displays and tracker logs (each one waits for the GPU)")
    run.add_argument("--report_to", choices=[t for t in LoggerType.list() if t != "all"],
                     help="also log to this tracker (tensorboard: OUTDIR/runs); pip install it first")
    return utils.parse_options(parser, argv)


def has_metrics():
    """Whether modeling.py has the optional metric_inputs() and compute_metrics() (else: the loss only)."""
    return hasattr(modeling, "metric_inputs") and hasattr(modeling, "compute_metrics")


def metrics_of(batch, outputs):
    """modeling.metric_inputs(batch, outputs): per-example tensors to gather from every process."""
    return modeling.metric_inputs(batch, outputs) if has_metrics() else {}


def compute_metrics(gathered):
    """modeling.compute_metrics(gathered): {name: value} over the whole validation set."""
    return modeling.compute_metrics(gathered) if has_metrics() else {}


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
            for key, value in metrics_of(batch, outputs).items():
                gathered[key].append(accelerator.gather_for_metrics(value))
            bar.update()
    model.train()
    metrics = {"loss": torch.cat(losses).mean().item(),
               **compute_metrics({key: torch.cat(values) for key, values in gathered.items()})}
    bar.set_postfix(metrics)
    bar.close()
    return metrics


def main(argv=None):
    args = parse_args(argv)
    for folder, option in [(args.model_name_or_path, "--model_name_or_path"), (args.resume, "--resume")]:
        if folder and Path(folder).is_dir():
            checkpoint.refuse_custom_code(folder, option)
    # The resumed run's position, read once (from .old-last if a crash left it there: verify() below
    # takes that back).
    resumed = checkpoint.read_state(checkpoint.find(args.resume)) if args.resume else None
    if not args.check:
        checkpoint.check_outdir(args.outdir, args.resume, resumed, args.overwrite)
    transformers.utils.logging.disable_progress_bar()  # save_pretrained's bars would break ours
    if resumed:  # on another number of processes: the same global batch, by --accumulation
        args.accumulation = checkpoint.elastic_accumulation(args.resume, resumed.num_processes, args.accumulation,
                                                            int(os.environ.get("WORLD_SIZE", 1)), args.ignore_mismatch)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.accumulation, mixed_precision=args.mixed_precision,
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if args.torch_compile else None,
        log_with=utils.tracker(args.report_to), project_dir=args.outdir,
        # Any sampler's permutation a function of (seed, epoch) only, so a resumed epoch replays it
        # (train.py's own samplers are built that way too).
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed))
    if accelerator.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
        # FSDP2 on CPU: accelerate maps an FSDP config to plain DDP when there is no GPU, though
        # torch's fully_shard runs on a CPU device mesh over gloo. Shard as the config asks (its
        # settings are in the ACCELERATE_FSDP_* variables accelerate launch set); tests use this.
        PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # Its optimizer state lives in DeepSpeed's engine, which the checkpoint code here never ran against.
        raise UserError("DeepSpeed is not supported by this template: FSDP2 is its sharded engine (configs/accelerate/"
                        "fsdp.yaml; tested sharded on CPU, with exact resume).")
    if args.resume:
        if accelerator.is_main_process:
            checkpoint.verify(args.resume)  # every file against the manifest, before anything is read
        accelerator.wait_for_everyone()
    threads = utils.cpu_threads(accelerator)
    if accelerator.device.type == "cpu":
        accelerator.print(f"{threads} CPU thread(s) per process (OMP_NUM_THREADS=N before the command to choose).")
    if args.sample_every and not hasattr(modeling, "format_samples"):
        raise UserError("--sample_every: modeling.py has no format_samples(model, tokenizer, batch, outputs, k).")
    if not has_metrics():
        accelerator.print("modeling.py has no metric_inputs() and compute_metrics(): validation reports the loss only.")
    set_seed(args.seed, device_specific=True)

    with accelerator.main_process_first():  # the main process tokenizes, the others read its cache
        # The data side decides whether there is a tokenizer (or other processor); on --resume it is the checkpoint's.
        load_tokenizer = getattr(dataset, "load_tokenizer", lambda source, args: None)
        tokenizer = load_tokenizer(args.resume or args.model_name_or_path, args)
        train_set = generate_dataset(args.train_file, args.train_split, tokenizer, args)
        valid_set = generate_dataset(args.valid_file, args.valid_split, tokenizer, args,
                                     getattr(train_set, "labels", None))
        data = {"train": checkpoint.describe_data(args.train_file, args.train_split, args.dataset_config,
                                                  len(train_set)),
                "valid": checkpoint.describe_data(args.valid_file, args.valid_split, args.dataset_config,
                                                  len(valid_set))}
    if resumed:
        checkpoint.check_data(resumed.data, data, args.resume, args.ignore_mismatch)
    model = build_model(args.model_name_or_path, train_set)
    if not isinstance(model, PreTrainedModel):
        raise UserError(f"build_model() in modeling.py returned a {type(model).__name__}, not a transformers "
                        f"PreTrainedModel, so its checkpoints could not be saved and loaded with save_pretrained "
                        f"/ from_pretrained. Subclass PreTrainedModel with a PretrainedConfig as config_class, as "
                        f"the default Model does.")
    if args.check:  # a few seconds of checks on the two user files instead of the run
        return finish(accelerator, check.run(accelerator, model, train_set, valid_set, args))
    greater_is_better = check.first_batch(model, train_set, valid_set, args, lambda batch, outputs: compute_metrics(
        metrics_of(batch, outputs)))
    accelerator.print(f"best/ keeps the epoch with the {'highest' if greater_is_better else 'lowest'} valid "
                      f"{args.metric_for_best} (--{'no-' if greater_is_better else ''}greater_is_better to change it).")
    if args.resume:
        checkpoint.load_weights(args.resume, model)
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
    collate = getattr(train_set, "collate", None)  # None: torch's default_collate
    sampler = (utils.LengthGroupedSampler(args.batch_size, train_set, args.seed) if args.group_by_length
               else utils.ShuffledSampler(len(train_set), args.seed))
    train_loader = DataLoader(train_set, args.batch_size, sampler=sampler, collate_fn=collate, **loader_options)
    valid_loader = DataLoader(valid_set, args.batch_size, collate_fn=getattr(valid_set, "collate", None),
                              **loader_options)
    model, optimizer, train_loader, valid_loader = accelerator.prepare(model, optimizer, train_loader, valid_loader)
    # Taken again after prepare(): FSDP2 replaces every parameter by a sharded one (a DTensor), and the
    # old ones would never see a gradient (nothing clipped, no NaN noticed).
    trained = [p for p in model.parameters() if p.requires_grad]

    # A prepared scheduler steps once per process at each optimizer step, so it is sized in those
    # units; with the loader's length taken after prepare (per process), the schedule comes out the
    # same for any number of processes and any accumulation.
    steps_per_epoch = math.ceil(len(train_loader) / args.accumulation)
    scheduler = accelerator.prepare(get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=steps_per_epoch * args.epochs * accelerator.num_processes))

    if accelerator.is_main_process:
        checkpoint.lock_outdir(args.outdir)  # one run per outdir, from here until this process ends
    state = resumed or checkpoint.TrainState(num_processes=accelerator.num_processes)
    if resumed:
        checkpoint.load_training_state(args.resume, state, accelerator, optimizer, scheduler, model)
        checkpoint.restore_rng(args.resume, accelerator)  # last: nothing may draw after it
    if args.resume and state.threads and state.threads != threads and accelerator.device.type == "cpu":
        accelerator.print(f"changed on resume: {state.threads} -> {threads} CPU threads per process; float sums "
                          f"come in another order, so the continuation is close to, not bitwise, the run it continues.")
    state.data, state.distributed_type, state.threads = data, accelerator.distributed_type.value, threads
    replacing = args.overwrite and not args.resume  # the previous run goes with this run's first checkpoint
    # The epoch's loss sums of each process, as saved: log.json's mean then comes out bitwise the same.
    running = utils.RunningLoss(accelerator.device, state.loss_sums[accelerator.process_index] if state.loss_sums
                                else (0.0, 0))
    if args.report_to:
        accelerator.init_trackers("runs", config={k: v if isinstance(v, (int, float, str, bool)) else str(v)
                                                  for k, v in vars(args).items()})

    model.train()  # from_pretrained() returns a model in eval mode (dropout off)
    preemption = utils.Preemption(args.outdir)  # SIGTERM / SIGUSR1 / Ctrl-C: finish the step, save last/, exit
    stop = None  # why the run ends before --epochs: a signal number or "--stop_after_steps"
    for epoch in range(state.epoch, args.epochs):
        if args.early_stopping_patience and state.bad_epochs >= args.early_stopping_patience:
            accelerator.print(f"Early stopping: valid {args.metric_for_best} has not improved on {state.best_metric:.4f} "
                              f"for {state.bad_epochs} epochs (--early_stopping_patience {args.early_stopping_patience}).")
            break
        state.epoch = epoch
        train_loader.set_epoch(epoch)
        done = state.steps_done_in_epoch * args.accumulation  # batches of this epoch before a resume
        batches = accelerator.skip_first_batches(train_loader, done) if done else train_loader
        bar = utils.progress(accelerator, None, f"[Epoch {epoch}] [TRAIN]", initial=done, total=len(train_loader))
        for batch in batches:
            with accelerator.accumulate(model):
                outputs = model(**batch)
                check.loss_of(model, batch, outputs)  # attributes only: no wait for the GPU
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients:
                    # After backward() every process holds the same (all-reduced) gradients, so all of
                    # them skip the same steps.
                    grad_norm = accelerator.clip_grad_norm_(trained, args.max_grad_norm or math.inf)
                    if isinstance(grad_norm, DTensor):  # FSDP2: replicated on every process
                        grad_norm = grad_norm.full_tensor()
                    if accelerator.scaler is None:  # fp16's scaler skips non-finite steps itself
                        nonfinite = ~torch.isfinite(grad_norm)
                        optimizer.optimizer.found_inf = nonfinite.float()  # fused AdamW: no update if 1
                        running.nonfinite_steps += nonfinite
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
            running.add(outputs.loss.detach())
            bar.update()  # by hand: the bar is closed before validation, inside the epoch's last step
            if not accelerator.sync_gradients:
                continue

            # One optimizer step done: show, validate at the end of the epoch, save, stop.
            state.global_step += 1
            state.steps_done_in_epoch += 1
            end_of_epoch = accelerator.gradient_state.end_of_dataloader
            if args.sample_every and state.global_step % args.sample_every == 0:
                utils.show_samples(accelerator, modeling.format_samples, model, tokenizer, batch, outputs, args.samples,
                                   state.global_step, bar)
            if state.global_step == args.stop_after_steps:
                stop = "--stop_after_steps"
            save = end_of_epoch or stop or (args.save_steps and state.global_step % args.save_steps == 0)
            if save or state.global_step % args.log_every == 0:
                # Before any save: nothing is saved after a non-finite step that went unnoticed.
                loss, nonfinite = running.since_shown()
                if nonfinite and not args.skip_nonfinite:
                    raise UserError(f"non-finite gradients in {nonfinite} of the optimizer steps up to step "
                                    f"{state.global_step} (epoch {epoch}); no update was made with them. Lower --lr, "
                                    f"check the data, or pass --skip_nonfinite to skip such steps.")
                state.skipped_steps += nonfinite
                if loss is not None:
                    values = {"loss": loss, "lr": scheduler.get_last_lr()[0]}
                    bar.set_postfix(values, refresh=False)
                    accelerator.log({f"train/{k}": v for k, v in values.items()}, step=state.global_step)
                stop = stop or preemption.received(accelerator) or None
                save = save or stop
            improved = False
            if end_of_epoch:
                bar.close()
                valid_log = evaluate(accelerator, model, valid_loader, f"[Epoch {epoch}] [VALID]")
                train_log = {"loss": running.epoch_mean(accelerator), "lr": scheduler.get_last_lr()[0]}
                if args.skip_nonfinite:
                    train_log["skipped_steps"], state.skipped_steps = state.skipped_steps, 0
                state.log[f"Epoch {epoch}"] = {"train_log": train_log, "valid_log": valid_log}
                accelerator.log({f"valid/{k}": v for k, v in valid_log.items()}, step=state.global_step)
                value = valid_log[args.metric_for_best]
                improved = state.best_metric is None or (value > state.best_metric if greater_is_better
                                                         else value < state.best_metric)
                state.best_metric = value if improved else state.best_metric
                state.bad_epochs = 0 if improved else state.bad_epochs + 1
                state.epoch, state.steps_done_in_epoch = epoch + 1, 0
                accelerator.print(f"[Epoch {epoch}] train loss {train_log['loss']:.4f}, "
                                  + ", ".join(f"valid {k} {v:.4f}" for k, v in valid_log.items())
                                  + (" (best so far: saved best/)" if improved else ""))
            if save:  # the periodic, the end-of-epoch and the final save are this one
                state.loss_sums = running.per_process(accelerator)
                checkpoint.save(accelerator, args.outdir, ["last", "best"] if improved else ["last"], model,
                                tokenizer, optimizer, scheduler, args, state, replacing)
                replacing = False
            if stop:
                break
        bar.close()
        if stop:
            break
    if stop:
        accelerator.print(f"Stopped by {f'signal {stop}' if isinstance(stop, int) else stop} after "
                          f"{state.global_step} optimizer steps; {args.outdir}/last holds the full state. "
                          f"Continue with: {utils.resume_command(accelerator, args.outdir)}")
    preemption.close()
    finish(accelerator, 128 + stop if isinstance(stop, int) else 0)  # a signal's status: a scheduler sees a preemption


def finish(accelerator, status):
    """Ends the run (or --check) with exit status `status`."""
    accelerator.end_training()
    if accelerator.num_processes > 1:
        # Everything is saved and fsynced. Skipping interpreter shutdown avoids a rare hang or abort
        # ("terminate called without an active exception") in the process-group threads at exit,
        # seen about 1 in 30 two-process CPU runs with gloo.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
