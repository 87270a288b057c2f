"""Runs a trained checkpoint over a data file and writes one JSON line per input row, in input
order.

    python predict.py --checkpoint model/best --input_file data/valid.jsonl --output_file out.jsonl
    python predict.py --input_file my/test.csv --embeddings   # also the vector the head reads
    python predict.py --input_file nyu-mll/glue --dataset_config sst2 --split validation

Each line is {"index": row, **predictions(...)} from modeling.py (default: {"label", "score"}), plus
"embedding" with --embeddings; without predictions() in modeling.py, the model's raw outputs (every
per-example tensor but the loss, as lists). The data is prepared by dataset.py exactly as in
training (max_len and the other options come from the checkpoint's my_config.json). A label column
is not needed; if there is one, dataset.py checks it against the training labels. One process, on
the GPU if there is one, else the CPU (for a large file, split it and run one predict.py per GPU).
"""

import argparse
import gc
import json
import os
import sys
from pathlib import Path

gc.disable()  # the imports make ~700,000 objects (~1 s of collections), as in train.py
import torch
import transformers
from safetensors import safe_open
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import dataset
import modeling
import utils
from core import check, checkpoint, options, step
from dataset import generate_dataset
from modeling import Model
from utils import UserError

gc.freeze()
gc.enable()


def parse_args(argv=None):
    parser = options.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint",
        default="model/best",
        help="a directory train.py wrote (model/best, model/last)",
    )
    parser.add_argument(
        "--input_file",
        required=True,
        help="a data file like training's (.jsonl .csv ...; labels optional) or a hub dataset name",
    )
    parser.add_argument("--output_file", default="predictions.jsonl")
    parser.add_argument(
        "--split", default="validation", help="the split of a hub dataset (ignored for files)"
    )
    parser.add_argument(
        "--dataset_config", help="a hub dataset's configuration (default: the training run's)"
    )
    parser.add_argument(
        "--batch_size", type=options.number(int, 1), default=64, help="reduce if out of memory"
    )
    parser.add_argument(
        "--embeddings", action="store_true", help='also write outputs.embeddings as "embedding"'
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace --output_file if it exists"
    )
    return parser.parse_args(argv)


def load_checkpoint(directory):
    """The model, its tokenizer and the options it was trained with (train.py's defaults where
    unknown)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(
            f"--checkpoint {directory}: no such directory. Give a checkpoint that train.py wrote, "
            f"e.g. model/best."
        )
    if not (directory / "config.json").is_file():
        raise UserError(
            f"--checkpoint {directory}: no config.json, so not a saved model. Give a checkpoint "
            f"that train.py wrote, e.g. model/best."
        )
    if (directory / "manifest.json").is_file():
        checkpoint.verify(
            directory, "--checkpoint", recover=False
        )  # every file whole and unchanged
    else:
        print(
            f"note: {directory} has no manifest.json (not saved by train.py?): its files are not "
            "checked.",
            file=sys.stderr,
        )
    check.refuse_custom_code(directory, "--checkpoint")
    try:
        saved_type = json.loads((directory / "config.json").read_text()).get("model_type")
    except (ValueError, AttributeError) as e:
        raise UserError(
            f"--checkpoint {directory}: {directory / 'config.json'} is damaged ({e})."
        ) from None
    expected = getattr(
        getattr(Model, "config_class", None), "model_type", None
    )  # None: an Auto class
    if expected and saved_type != expected:
        raise UserError(
            f"--checkpoint {directory}: trained with another modeling.py (model_type {saved_type}; "
            f"this modeling.py builds {expected}). Copy back the modeling.py and dataset.py it was "
            "trained with."
        )
    try:
        with safe_open(directory / "model.safetensors", "pt") as f:
            f.keys()
    except Exception as e:  # safetensors' errors have classes of their own
        raise UserError(
            f"--checkpoint {directory}: {directory / 'model.safetensors'} is damaged or missing "
            f"({str(e).splitlines()[0][:200]})."
        ) from None
    if (directory / "my_config.json").is_file():  # read and checked as --resume reads it
        trained_with = options.parse_args(["--resume", str(directory)])
    else:
        trained_with = options.parse_args([])  # a checkpoint saved by hand
        print(
            f"note: {directory} has no my_config.json; the data is prepared with train.py's "
            f"defaults (--max_len {trained_with.max_len}).",
            file=sys.stderr,
        )
    try:
        # Weights from safetensors only (never a pickled .bin), no code from the folder.
        model = Model.from_pretrained(directory, trust_remote_code=False, use_safetensors=True)
        load_tokenizer = getattr(dataset, "load_tokenizer", lambda source, args: None)
        tokenizer = load_tokenizer(directory, trained_with)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
        raise UserError(
            f"--checkpoint {directory}: could not load it with modeling.py's Model "
            f"({str(e).splitlines()[0][:300]})."
        ) from None
    if (directory / "ema.pt").is_file():  # --ema_decay: the weights that validation ran
        average = checkpoint.load_tensors(directory / "ema.pt")  # torch's AveragedModel's
        average.pop("n_averaged", None)
        model.load_state_dict({k.removeprefix("module."): v for k, v in average.items()})
        print(
            f"note: predicting with the EMA of the weights ({directory / 'ema.pt'}).",
            file=sys.stderr,
        )
    return model, tokenizer, trained_with


def write_lines(path, lines):
    """Writes via a temporary file and a rename: the output is whole or absent, never half
    written. Returns the number of lines."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    written = 0
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
                written += 1
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return written


def raw_outputs(model, tokenizer, batch, outputs):
    """For a modeling.py without predictions(): each per-example tensor of the outputs (not the
    loss)."""
    size = len(next(iter(batch.values())))
    tensors = {
        key: value
        for key, value in outputs.items()
        if key != "loss" and torch.is_tensor(value) and value.dim() > 0 and len(value) == size
    }
    return [{key: value[i].float().tolist() for key, value in tensors.items()} for i in range(size)]


def predict(model, tokenizer, loader, device, with_embeddings):
    """Yields (input row, prediction dict) per example, in the loader's order: the row is the
    batch's "row" value of the example where dataset.py gives one (a row that makes several
    examples, such as the windows of a long text), else the example's own index."""
    predictions = getattr(modeling, "predictions", raw_outputs)
    index = 0
    with torch.inference_mode():
        for batch in tqdm(loader, desc="[PREDICT]", dynamic_ncols=True):
            batch = {
                key: value.to(device) if torch.is_tensor(value) else value
                for key, value in batch.items()
            }
            outputs = step.forward(model, batch)
            rows = predictions(model, tokenizer, batch, outputs)  # model.generate() if it likes
            batch_size = len(next(iter(batch.values())))
            if len(rows) != batch_size:
                raise UserError(
                    f"predictions() in modeling.py returned {len(rows)} dicts for a batch of "
                    f"{batch_size} examples; it must return one per example."
                )
            if with_embeddings:
                if getattr(outputs, "embeddings", None) is None:
                    raise UserError(
                        "--embeddings: Model.forward() returns no .embeddings (see modeling.py)."
                    )
                for row, vector in zip(rows, outputs.embeddings.float().cpu().tolist()):
                    row["embedding"] = vector
            numbers = batch.get("row")
            numbers = numbers.tolist() if torch.is_tensor(numbers) else numbers
            for k, row in enumerate(rows):
                yield (numbers[k] if numbers is not None else index), row
                index += 1


def lines(predictions):
    """One line per input row, in order: {"index": row, **prediction}. The several examples of one
    row (consecutive: the loader keeps the order) are merged by modeling.merge_predictions(list of
    dicts) -> dict where it has one (the examples' own choice: the best-scoring window, say), else
    listed under "examples"."""
    merge = getattr(modeling, "merge_predictions", None)
    for row, line in check.one_line_per_row(predictions, merge):
        yield {"index": row, **line}


def check_output_file(args):
    """Never over the input, a checkpoint's files, or (without --overwrite) any existing file."""
    output = Path(args.output_file).resolve()
    if output.is_dir():
        raise UserError(
            f"--output_file {args.output_file} is a directory; give a file name, e.g. "
            f"{Path(args.output_file) / 'predictions.jsonl'}."
        )
    if output == Path(args.input_file).resolve():
        raise UserError(f"--output_file {args.output_file} is the input file; give another name.")
    if output.parent == Path(args.checkpoint).resolve():
        raise UserError(
            f"--output_file {args.output_file} is inside the checkpoint {args.checkpoint}; give a "
            f"file elsewhere."
        )
    if output.exists() and not args.overwrite:
        raise UserError(
            f"--output_file {args.output_file} exists; add --overwrite to replace it, or give "
            f"another name."
        )


def main(argv=None):
    args = parse_args(argv)
    check_output_file(args)
    transformers.utils.logging.disable_progress_bar()
    check.check_hooks(modeling)
    model, tokenizer, trained_with = load_checkpoint(args.checkpoint)
    if Path(args.input_file).suffix in utils.FILE_TYPES and not Path(args.input_file).is_file():
        raise UserError(f"--input_file {args.input_file}: no such file.")
    if args.dataset_config:
        trained_with.dataset_config = args.dataset_config
    # Label names in the order of their ids, so that a label column (optional) maps as in training.
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)] or None
    data = generate_dataset(
        args.input_file, args.split, tokenizer, trained_with, labels=labels, predicting=True
    )
    # In order (no shuffling), padded per batch by the dataset's collate, like the validation
    # loader.
    loader = DataLoader(data, args.batch_size, collate_fn=getattr(data, "collate", None))
    if not hasattr(modeling, "predictions"):
        print(
            "note: modeling.py has no predictions(model, tokenizer, batch, outputs): writing the "
            "model's raw outputs.",
            file=sys.stderr,
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    written = write_lines(
        args.output_file, lines(predict(model, tokenizer, loader, device, args.embeddings))
    )
    print(f"Wrote {written} predictions to {args.output_file}", file=sys.stderr)


if __name__ == "__main__":
    main()
