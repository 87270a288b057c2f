"""Trains the model of modeling.py on the data of dataset.py; resumes bitwise with --resume.

    accelerate launch train.py                                   # the shipped sample task, CPU or GPU
    accelerate launch train.py --train_file my/train.jsonl --valid_file my/valid.jsonl --epochs 5
    accelerate launch train.py --resume model/last --epochs 8    # continue, or train further epochs
    accelerate launch --multi_gpu --num_processes 4 train.py ... # see README.md for more

Writes OUTDIR/best/ (best validation loss), OUTDIR/last/ (end of each epoch, every --save_steps)
and OUTDIR/log.json. This file is task-free: edit modeling.py and dataset.py, not the loop.
"""
import argparse
import math
import os
import sys
from collections import defaultdict

import torch
import transformers
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, get_scheduler

import utils
from dataset import generate_dataset
from modeling import build_model, compute_metrics, metric_inputs
from utils import UserError


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)  # so that a misspelled option is an error
    parser.add_argument("--config", help="JSON or YAML file of option defaults, e.g. configs/tiny.yaml; flags override it")
    # data
    parser.add_argument("--train_file", default="data/train.jsonl", help=".jsonl, .csv or .tsv (see dataset.py)")
    parser.add_argument("--valid_file", default="data/valid.jsonl")
    parser.add_argument("--max_len", type=int, default=128, help="longer inputs are truncated (tokens)")
    # model
    parser.add_argument("--model_name_or_path", default="assets/tiny-bert",
                        help="hub id (bert-base-cased) or local directory; a directory with only a "
                             "config.json trains that architecture from scratch")
    # optimisation
    parser.add_argument("--epochs", type=int, default=5, help="may be raised on --resume to train further")
    parser.add_argument("--batch_size", type=int, default=32, help="per process; reduce if out of memory")
    parser.add_argument("--accumulation", type=int, default=1, help="batches per optimizer step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate; 2e-5 suits a pretrained BERT")
    parser.add_argument("--weight_decay", type=float, default=0.01, help="on matrices only, not biases/norms")
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="clip gradients to this norm; 0 = off")
    parser.add_argument("--lr_scheduler_type", default="linear",
                        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                 "constant_with_warmup"])
    parser.add_argument("--num_warmup_steps", type=int, default=0, help="optimizer steps of linear warmup")
    parser.add_argument("--skip_nonfinite", action="store_true",
                        help="skip optimizer steps whose gradients are NaN/inf (counted in log.json) instead of stopping")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"],
                        help="default: what `accelerate config` / `accelerate launch` says")
    # run
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--outdir", default="model")
    parser.add_argument("--overwrite", action="store_true", help="replace a previous run in --outdir")
    parser.add_argument("--resume", metavar="DIR", help="a checkpoint (model/last or model/best) to continue; "
                        "its my_config.json gives the defaults")
    parser.add_argument("--ignore_mismatch", action="store_true",
                        help="resume even with another batch size, seed, model or number of processes")
    parser.add_argument("--save_steps", type=int, default=0, help="also save last/ every N optimizer steps")
    parser.add_argument("--stop_after_steps", type=int, default=0,
                        help="save last/ and stop after N optimizer steps in all; the schedule still spans "
                             "--epochs, so --resume continues as if never stopped (time-limited jobs)")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader worker processes")
    return utils.parse_options(parser, argv)


def evaluate(accelerator, model, loader, desc):
    """Validation loss and metrics over the whole validation set, gathered from every process."""
    model.eval()
    losses, gathered = [], defaultdict(list)
    with torch.no_grad():
        for batch in (bar := utils.progress(accelerator, loader, desc)):
            outputs = model(**batch)
            batch_size = len(next(iter(batch.values())))
            losses.append(accelerator.gather_for_metrics(outputs.loss.detach().float().repeat(batch_size)))
            for key, value in metric_inputs(batch, outputs).items():
                gathered[key].append(accelerator.gather_for_metrics(value))
            bar.set_postfix(loss=outputs.loss.item(), refresh=False)
    model.train()
    metrics = compute_metrics({key: torch.cat(values) for key, values in gathered.items()})
    return {"loss": torch.cat(losses).mean().item(), **metrics}


def main(argv=None):
    args = parse_args(argv)
    utils.check_outdir(args.outdir, args.resume, args.overwrite)
    transformers.utils.logging.disable_progress_bar()  # save_pretrained's bars would break ours
    accelerator = Accelerator(
        gradient_accumulation_steps=args.accumulation, mixed_precision=args.mixed_precision,
        # The sampler's permutation is a function of (data_seed, epoch) only, so it can be replayed.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed))
    set_seed(args.seed, device_specific=True)

    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
    train_set = generate_dataset(args.train_file, tokenizer, args.max_len)
    valid_set = generate_dataset(args.valid_file, tokenizer, args.max_len, train_set)
    model = build_model(args.model_name_or_path, train_set)
    if args.resume:
        utils.load_weights(args.resume, model)

    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices and embeddings, not biases or norms
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    # Own generators: creating a loader's iterator then draws no number from the global RNG, whose
    # stream (dropout) must continue unchanged after a resume.
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, collate_fn=train_set.collate,
                              num_workers=args.num_workers, generator=torch.Generator())
    valid_loader = DataLoader(valid_set, batch_size=args.batch_size, collate_fn=valid_set.collate,
                              num_workers=args.num_workers, generator=torch.Generator())
    model, optimizer, train_loader, valid_loader = accelerator.prepare(model, optimizer, train_loader, valid_loader)

    # A prepared scheduler steps once per process at each optimizer step, so it is sized in those
    # units; with the loader's length taken after prepare (per process), the schedule comes out the
    # same for any number of processes and any accumulation.
    steps_per_epoch = math.ceil(len(train_loader) / args.accumulation)
    scheduler = accelerator.prepare(get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=steps_per_epoch * args.epochs * accelerator.num_processes))

    state = utils.TrainState(num_processes=accelerator.num_processes)
    per_process = {"loss_sum": torch.zeros((), dtype=torch.float64), "batches": torch.zeros((), dtype=torch.int64)}
    if args.resume:
        state = utils.load_training_state(args.resume, accelerator, optimizer, scheduler, args.ignore_mismatch)
        per_process.update(utils.restore_rng(args.resume, accelerator))  # last: nothing may draw after it
    elif args.overwrite:
        utils.clear_outdir(accelerator, args.outdir)
    loss_sum, batches = (per_process["loss_sum"].to(accelerator.device), per_process["batches"].to(accelerator.device))

    def save(names):
        utils.save_checkpoint(accelerator, args.outdir, names, model, tokenizer, optimizer, scheduler, args, state,
                              {"loss_sum": loss_sum.cpu(), "batches": batches.cpu()})

    stopped = preempted = False
    preemption = utils.Preemption()  # SIGTERM / SIGUSR1: finish the step, save last/, exit
    for epoch in range(state.epoch, args.epochs):
        state.epoch = epoch
        train_loader.set_epoch(epoch)
        skipped = state.steps_done_in_epoch * args.accumulation
        batches_left = accelerator.skip_first_batches(train_loader, skipped) if skipped else train_loader
        bar = utils.progress(accelerator, batches_left, f"[Epoch {epoch}] [TRAIN]", initial=skipped,
                             total=len(train_loader))
        for batch in bar:
            with accelerator.accumulate(model):
                outputs = model(**batch)
                if getattr(outputs, "loss", None) is None:
                    raise UserError("Model.forward() returned no loss: return a ModelOutput with .loss set "
                                    "(see modeling.py).")
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients:
                    # After backward() every process holds the same (all-reduced) gradients, so all of
                    # them take the same decision here: a NaN on one process is a NaN everywhere.
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm or math.inf)
                    if torch.isfinite(grad_norm) or accelerator.scaler is not None:  # fp16: the scaler skips
                        optimizer.step()
                        scheduler.step()
                    elif args.skip_nonfinite:
                        state.skipped_steps += 1
                    else:
                        raise UserError(f"non-finite gradients (loss {outputs.loss.item()}) at epoch {epoch}, "
                                        f"optimizer step {state.global_step + 1}; no update was made with them. "
                                        f"Lower --lr, check the data, or pass --skip_nonfinite to skip such steps.")
                    optimizer.zero_grad()
            finite = torch.isfinite(outputs.loss.detach())
            loss_sum += torch.where(finite, outputs.loss.detach(), 0.0)
            batches += finite
            if not accelerator.sync_gradients:
                continue
            state.global_step += 1
            state.steps_done_in_epoch += 1
            bar.set_postfix(loss=outputs.loss.item(), lr=scheduler.get_last_lr()[0], refresh=False)
            preempted = preemption.received(accelerator)
            stopped = state.global_step == args.stop_after_steps or preempted
            if accelerator.gradient_state.end_of_dataloader:
                continue  # the end-of-epoch save below serves --save_steps and --stop_after_steps too
            if stopped or (args.save_steps and state.global_step % args.save_steps == 0):
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
        loss_sum.zero_()
        batches.zero_()
        improved = valid_log["loss"] < state.min_valid_loss
        state.min_valid_loss = min(valid_log["loss"], state.min_valid_loss)
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
                          f"the full state. Continue with: accelerate launch train.py --resume {args.outdir}/last")
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
