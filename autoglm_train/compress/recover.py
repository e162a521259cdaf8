"""Recovery after pruning: a short, low-learning-rate fine-tune of the student on the training stream,
optionally distilled from the unpruned teacher.

The distillation terms follow what a dual encoder is used for: the student's image->text and
text->image similarity distributions over the batch should match the teacher's (KL, both directions,
at the teacher's temperature), and its embeddings should stay where the teacher's are (MSE), so an index
built with the teacher keeps working. The contrastive loss on the true pairs stays in.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from autoglm_train.eval.retrieval import retrieval_metrics
from autoglm_train.losses.infonce import infonce_loss


def similarity_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the row-wise softmax, averaged over rows, for both directions."""

    def one(s, t):
        return F.kl_div(
            F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), log_target=True, reduction="batchmean"
        )

    return (one(student_logits, teacher_logits) + one(student_logits.T, teacher_logits.T)) / 2


def distill_loss(student, teacher, images, tokens, kl_weight: float, mse_weight: float) -> dict:
    image, text = student.encode_image(images), student.encode_text(tokens)
    scale = student.logit_scale()
    terms = {"contrastive": infonce_loss(image, text, image, text, scale)}
    if teacher is not None:
        with torch.no_grad():
            t_image, t_text = teacher.encode_image(images), teacher.encode_text(tokens)
            t_scale = teacher.logit_scale()
        terms["kl"] = kl_weight * similarity_kl(t_scale * image @ text.T, t_scale * t_image @ t_text.T)
        terms["mse"] = mse_weight * (
            (image - t_image).pow(2).sum(-1).mean() + (text - t_text).pow(2).sum(-1).mean()
        )
    terms["loss"] = sum(terms.values())
    return terms


def finetune(
    student,
    batches: Iterable[dict],
    steps: int,
    lr: float = 1e-4,
    teacher=None,
    kl_weight: float = 1.0,
    mse_weight: float = 1.0,
    progress: bool = True,
    desc: str = "fine-tune",
) -> list[float]:
    """``steps`` AdamW steps (no weight decay, cosine to 0) on ``batches``; returns the losses."""
    if steps <= 0:
        return []
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    if teacher is not None:
        teacher.eval()
    student.train()
    losses = []
    bar = tqdm(total=steps, desc=desc, disable=not progress)
    for _, batch in zip(range(steps), cycle(batches), strict=False):
        terms = distill_loss(student, teacher, batch["image"], batch["text"], kl_weight, mse_weight)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(terms["loss"].detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    student.eval()
    return losses


def cycle(batches: Iterable[dict]) -> Iterator[dict]:
    """Endless passes over a re-iterable source (a DataLoader starts a new epoch each pass)."""
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("the training stream gave no batch")


@torch.no_grad()
def evaluate(model, batches: Iterable[dict]) -> dict[str, float]:
    """Retrieval R@K both ways on held-out batches (all captions of each image), as in training."""
    model.eval()
    parts: dict[str, list] = {"image": [], "id": [], "text": [], "text_id": []}
    for batch in batches:
        parts["image"].append(model.encode_image(batch["image"]).float())
        parts["text"].append(model.encode_text(batch["text"]).float())
        parts["id"].append(batch["id"])
        parts["text_id"].append(batch["text_id"])
    whole = {k: torch.cat(v) for k, v in parts.items()}
    metrics = retrieval_metrics(whole["image"], whole["id"], whole["text"], whole["text_id"])
    return {f"val/{k}": v for k, v in metrics.items()}


def frozen_copy(model):
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
