"""CaRot (Oh, Lim, Kim, Han, Yun, Choo, Hauptmann, Cheng, Song; Towards Calibrated Robust Fine-Tuning of
Vision-Language Models, NeurIPS 2024, arXiv 2311.01723).

FLYP's contrastive loss plus two regularisers, as the official code computes them
(MLAI-Yonsei/CaRot @ c3e8bdc, ``src/models/carot_loss.py``; defaults from its README recipe):

* **Orthogonality constraint** on the visual projection W_v (``visual.proj``, [width, embed]):
  λ_OC·‖W_vᵀW_v − I‖_F, the Frobenius norm itself, not its square (``--l_orth_wv`` 0.2).
* **Cross term** ``--cross_fnorm`` 0.05: 0.05·‖W_v W_tᵀ‖_F with W_t the text projection (the code
  computes ``visual.proj @ text_projection.T``; it is in the README recipe, the paper's captions read
  so far do not name it).
* **EMA self-distillation**, λ_SD·L_SD (``--distil_coef`` 1.5): the teacher starts as the pre-trained
  model; from step 1 on, L_SD = −Σ_j [softmax(T_img)·log softmax(S_img) + softmax(T_txt)·log
  softmax(S_txt)]_j averaged over the batch's rows, where S and T are the student's and the
  teacher's in-batch image→caption and caption→image logits, each with its own ``logit_scale``
  (no extra temperature; the two directions summed). After the optimiser step of every step s with
  s mod 500 = 0 (``--ema_up_freq``), the teacher's parameters become m·θ_t + (1−m)·θ_s, with m
  rising linearly from 0.05 to 0.9 over the first 20 % of the steps and 0.9 after
  (``--m_sche_src``, ``--m_sche_tar``, ``--m_warm_up``).

The student is what is evaluated (the code evaluates it, with the zero-shot head rebuilt from its
text tower, as FLYP). Schedule: FLYP's recipe here (lr 1e-5, wd 0.1, batch 512, 10 epochs, 500
warmup steps: the CaRot README's command); the code also uses fp16 AMP, which the harness leaves to
``--precision``.

Departures, written down: (1) the code updates the teacher right after the optimiser step; here the
update due after step s is applied at the start of step s+1 (before anything reads the teacher, so
the values are the same), and the code's update "at the last step" never fires there
(``step == num_batches·epochs`` is one past the last index), so none is done here either.
(2) The teacher lives inside the trained module (frozen, excluded from the optimiser), so a
resumable training state holds it and a resumed run continues bit-exactly. (3) The teacher runs in
``eval()`` mode (this matters only for batch-norm towers). (4) log∘softmax is computed as
``log_softmax``. (5) On ResNet towers the projection is ``attnpool.c_proj``, whose weight is stored
[out, in]: W_v is its transpose, so W_vᵀW_v is [embed, embed] as for ViT (the code's RN branch was not
checked). With every coefficient 0 this is FLYP exactly. Under accumulation and DDP the
distillation term is a function of the gathered batch and the two penalties are counted once per
step (:class:`CaptionedContrastiveLoss`).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from robustbench_ft import distributed
from robustbench_ft.datasets.registry import get_dataset
from robustbench_ft.methods.context import Candidate, MethodContext
from robustbench_ft.methods.flyp import CaptionedContrastiveLoss, FlypOptions, clip_features, flyp_classifier
from robustbench_ft.methods.registry import register_method
from robustbench_ft.methods.training import Batch, Step


@dataclass(frozen=True)
class CarotOptions(FlypOptions):
    orth: float = 0.2            # λ_OC of ‖W_vᵀW_v − I‖_F (README --l_orth_wv 0.2)
    cross_fnorm: float = 0.05    # coefficient of ‖W_v W_tᵀ‖_F (README --cross_fnorm 0.05)
    distil: float = 1.5          # λ_SD of the EMA self-distillation (README --distil_coef 1.5)
    ema_every: int = 500         # teacher update every N steps (args.py --ema_up_freq 500)
    momentum_start: float = 0.05  # teacher momentum at step 0 (args.py --m_sche_src)
    momentum_end: float = 0.9    # teacher momentum after the ramp (args.py --m_sche_tar)
    momentum_warmup: float = 0.2  # share of the steps over which the momentum ramps (args.py --m_warm_up)

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.orth, self.cross_fnorm, self.distil) < 0 or self.ema_every < 1:
            raise ValueError("carot: orth, cross_fnorm and distil must be >= 0 and ema_every >= 1")
        if not (0 <= self.momentum_start <= 1 and 0 <= self.momentum_end <= 1 and 0 <= self.momentum_warmup <= 1):
            raise ValueError("carot: the teacher momenta and momentum_warmup must lie in [0, 1]")
        if self.loss != "contrastive":
            raise ValueError("carot regularises FLYP's contrastive loss; --loss ce is not part of it")


class StudentTeacher(torch.nn.Module):
    """The trained CLIP model (``student``; its forward is this module's) and a frozen EMA copy (``teacher``)."""

    def __init__(self, student: torch.nn.Module):
        super().__init__()
        self.student = student
        self.teacher = copy.deepcopy(student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.student(*args, **kwargs)


def visual_projection(model: torch.nn.Module) -> torch.Tensor:
    """W_v [width, embed]: ``visual.proj`` of a ViT tower, ``attnpool.c_proj.weight``ᵀ of a ResNet one."""
    visual = model.visual
    if isinstance(getattr(visual, "proj", None), torch.Tensor):
        return visual.proj
    attnpool = getattr(visual, "attnpool", None)
    if attnpool is not None:
        return attnpool.c_proj.weight.T
    raise ValueError(f"carot: the image tower ({type(visual).__name__}) has no visual projection (visual.proj or "
                     "attnpool.c_proj) for the orthogonality constraint; use --orth 0 --cross-fnorm 0")


def teacher_momentum(step: int, total: int, opts: CarotOptions) -> float:
    """m at step ``step``: linear from momentum_start to momentum_end over the first momentum_warmup of the run."""
    ramp = total * opts.momentum_warmup
    if step < ramp:
        return (opts.momentum_end - opts.momentum_start) / ramp * step + opts.momentum_start
    return opts.momentum_end


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, m: float) -> None:
    """θ_t ← m·θ_t + (1−m)·θ_s over the parameters (buffers are left alone, as in the code)."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(m).add_((1 - m) * s.detach())


def distillation_loss(student_image: torch.Tensor, student_text: torch.Tensor, scale: torch.Tensor,
                      teacher_logits: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """L_SD of the module docstring: soft-target CE from the teacher's in-batch logits, both directions summed."""
    per_image = scale * student_image @ student_text.T
    per_text = scale * student_text @ student_image.T
    terms = [(F.softmax(t.float(), dim=1) * F.log_softmax(s.float(), dim=1)).sum(dim=1)
             for s, t in zip((per_image, per_text), teacher_logits)]
    return -(terms[0] + terms[1]).mean()


class CarotLoss(CaptionedContrastiveLoss):
    """FLYP's loss + λ_SD·L_SD on the gathered batch + the two projection penalties once per step."""

    def __init__(self, tokenizer, classnames: list[str], templates: list[str], opts: CarotOptions):
        super().__init__(tokenizer, classnames, templates, collisions=opts.collisions, prompts=opts.prompts)
        self.opts = opts

    def prepare(self, step: Step, batch: Batch, texts: torch.Tensor) -> Any:
        """The teacher's in-batch logits of the whole gathered batch (after its due EMA update), from step 1 on."""
        if self.opts.distil == 0 or step.index == 0:
            return None
        pair: StudentTeacher = distributed.unwrap(step.model)
        done = step.index - 1  # the step whose optimiser update was just applied
        if done % self.opts.ema_every == 0:
            ema_update(pair.teacher, pair.student, teacher_momentum(done, step.total_steps, self.opts))
        pair.teacher.eval()
        with torch.no_grad(), step.autocast():
            parts = [clip_features(pair.teacher, images, tokens) for images, tokens in
                     zip(batch.images.chunk(step.accum_steps), texts.chunk(step.accum_steps))]
            images = distributed.all_gather_tensor(torch.cat([p[0] for p in parts]))
            captions = distributed.all_gather_tensor(torch.cat([p[1] for p in parts]))
            scale = parts[0][2]
            return scale * images @ captions.T, scale * captions @ images.T

    def batch_loss(self, image_features, text_features, scale, labels, state, step) -> torch.Tensor:
        loss = super().batch_loss(image_features, text_features, scale, labels, state, step)
        if state is None:
            return loss
        return loss + self.opts.distil * distillation_loss(image_features, text_features, scale, state)

    def penalty(self, model: torch.nn.Module, step: Step) -> torch.Tensor | None:
        clip = model.student if isinstance(model, StudentTeacher) else model
        terms = []
        if self.opts.cross_fnorm:
            terms.append(self.opts.cross_fnorm * torch.linalg.norm(visual_projection(clip) @ clip.text_projection.T))
        if self.opts.orth:
            w = visual_projection(clip)
            gram = w.T @ w
            terms.append(self.opts.orth * torch.linalg.norm(gram - torch.eye(len(gram), device=gram.device)))
        return sum(terms) if terms else None


@register_method("carot", paper="Oh et al., Towards Calibrated Robust Fine-Tuning of Vision-Language Models, "
                 "NeurIPS 2024")
class Carot:
    """FLYP + orthogonality constraint on the visual projection + EMA self-distillation (the calibration reference)."""

    options = CarotOptions

    def run(self, ctx: MethodContext) -> list[Candidate]:
        opts: CarotOptions = ctx.options
        ref = get_dataset(ctx.suite.reference)
        loss = CarotLoss(ctx.clip.tokenizer, list(ref.classnames), list(ref.templates), opts)
        return ctx.trained_endpoint(lambda: flyp_classifier(
            ctx, opts, loss, method="carot", wrap=StudentTeacher if opts.distil else None,
            provenance={"carot": {"orth": opts.orth, "cross_fnorm": opts.cross_fnorm, "distil": opts.distil}}))
