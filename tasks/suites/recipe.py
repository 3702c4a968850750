"""The papers' training recipe, as suite defaults: LLaVA-1.5's LoRA fine-tuning, which both
LLaVA-c and HiDe-LLaVA follow, and each benchmark's own batch size. Every value names its
source. Method-specific values (a method's LoRA rank) belong to the method
(``@register_method(recipe=...)``); the user's config and ``--set`` override both.

Sources: [L] LLaVA-1.5, ``scripts/v1_5/finetune_lora.sh`` of the LLaVA repository (8 GPUs x 16
per GPU); [Le] LLaVA-1.5's evaluation scripts (``model_vqa_loader.py``); [H] HiDe-LLaVA,
section 4.1 "Implementation details" (UCIT, and CoIN in its Table 2); [C] LLaVA-c, appendix
A.1, Table 6, "Finetune" column. bf16 ([L] ``--bf16 True``) is ``model.dtype: auto`` on CUDA.
"""

from __future__ import annotations

LLAVA_15_LORA: dict[str, object] = {
    "train.learning_rate": 2e-4,  # [L] --learning_rate 2e-4 (the LoRA's; [H] 2e-4 too)
    "train.projector_lr": 2e-5,  # [L] --mm_projector_lr 2e-5; [H] 2e-5
    "train.epochs": 1.0,  # [L] --num_train_epochs 1; [H] and [C] 1 epoch per task
    "train.warmup_ratio": 0.03,  # [L] --warmup_ratio 0.03; [H]; [C]
    "train.lr_scheduler": "cosine",  # [L] --lr_scheduler_type cosine; [H]; [C]
    "train.weight_decay": 0.0,  # [L] --weight_decay 0.; [C]
    "train.max_length": 2048,  # [L] --model_max_length 2048 (text is cut, never the image)
    "train.gradient_checkpointing": True,  # [L] --gradient_checkpointing True
    "train.dataloader_workers": 4,  # [L] --dataloader_num_workers 4
    # what fits one 80 GB GPU at 13B with 2048-token samples (docs/gpu.md); the effective batch
    # is train.global_batch_size, reached by gradient accumulation
    "train.batch_size": 8,
    "model.conversation": "vicuna_v1",  # [L] --version v1 (conv_vicuna_v1)
    "model.image_aspect_ratio": "pad",  # [L] --image_aspect_ratio pad
    "eval.max_new_tokens": 128,  # [Le] --max_new_tokens 128
}

# [H] "We set the batch size to 24 for all methods" (UCIT and CoIN)
HIDE_LLAVA_BENCHMARK = {**LLAVA_15_LORA, "train.global_batch_size": 24}

# [C] Table 6: batch size 128 (8 GPUs x 8 per GPU x 2 accumulation steps, section 5.1); its
# learning rate 2e-5 is LLaVA-1.5's full fine-tuning rate, and its LoRA follows [L]: 2e-4 for
# the LoRA, 2e-5 for the projector
LLAVA_C_BENCHMARK = {**LLAVA_15_LORA, "train.global_batch_size": 128}
