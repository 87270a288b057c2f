"""LoRA: --lora_r adapters (PEFT, through transformers' add_adapter) in the frozen backbone."""

import torch
import transformers
from packaging import version

from core.processes import say
from utils import UserError, has_weights


def add_lora(model, args):
    """--lora_r: LoRA adapters (PEFT, through transformers' add_adapter) in the backbone, which is
    frozen; the rest of the model (the head) trains in full. On --resume the adapters are the
    checkpoint's."""
    try:
        import peft
    except ImportError:
        raise UserError("--lora_r needs the peft package: pip install peft") from None
    from transformers.integrations.peft import MIN_PEFT_VERSION

    if version.parse(peft.__version__) < version.parse(MIN_PEFT_VERSION):
        raise UserError(
            f"--lora_r: transformers {transformers.__version__} needs peft >= {MIN_PEFT_VERSION}, "
            f"installed {peft.__version__}. Install the tested versions: pip install -r "
            "requirements.txt -c constraints.txt"
        )
    if not args.resume and not has_weights(
        args.model_name_or_path
    ):  # perplexity 222 against 1.8 in full
        say(
            f"warning: --lora_r on {args.model_name_or_path}, which holds no weights: its backbone "
            "is random and stays frozen, so the adapters learn little. LoRA needs a pretrained "
            "backbone: give one (a hub id, or the best/ of a full run), or drop --lora_r to train "
            "every weight."
        )
    backbone = {id(p) for p in model.base_model.parameters()}
    if args.resume:
        model.load_adapter(str(args.resume), is_trainable=True)
    else:
        # Every linear layer of the backbone by default: nn.Linear, and the Conv1D of GPT-2 (a
        # linear layer with its weight transposed), which PEFT adapts alike.
        linear = (torch.nn.Linear, transformers.pytorch_utils.Conv1D)
        targets = (
            args.lora_target_modules.split(",")
            if args.lora_target_modules
            else [
                f"{model.base_model_prefix}.{name}"
                for name, module in model.base_model.named_modules()
                if isinstance(module, linear)
            ]
        )
        if not targets:
            raise UserError(
                f"--lora_r: the backbone of {type(model).__name__} has no linear layer to adapt; "
                "name the layers with --lora_target_modules (e.g. q_proj,v_proj)."
            )
        conv1d = any(
            isinstance(m, transformers.pytorch_utils.Conv1D) for m in model.base_model.modules()
        )
        try:
            model.add_adapter(
                peft.LoraConfig(
                    r=args.lora_r,
                    lora_alpha=args.lora_alpha,
                    fan_in_fan_out=conv1d,
                    lora_dropout=args.lora_dropout,
                    target_modules=targets,
                )
            )
        except ValueError as e:
            raise UserError(
                f"--lora_target_modules {args.lora_target_modules}: {str(e).splitlines()[0][:300]}"
            ) from None
    for param in model.parameters():
        param.requires_grad = id(param) not in backbone  # the adapters and the head
