"""Prompt adapters: how a model takes its prompts and how its self-ensemble members vary them.

Each registered model names one (registry field `prompt`). An adapter decodes a prompt set
with a predictor (SamPredictor3D or SamPredictor2D; host arrays in and out) and draws the N
member prompt sets of the self-ensemble from the first result.
"""

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np

from .uncertainty import EnsembleConfig, jittered_boxes, sample_prompt_sets

Prompts = Dict[str, np.ndarray]  # {"points": (B, P, D), "labels": (B, P)} or {"boxes": (B, 4)}


def best_of(logits: np.ndarray, iou: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per prompt set, the mask with the highest predicted IoU: (B, 1, ...) and (B,)."""
    best = iou.argmax(1)
    rows = np.arange(len(best))
    return logits[rows, best][:, None], iou[rows, best]


@dataclass(frozen=True)
class PointPrompt:
    """Positive/negative clicks. mask_feedback: how the previous low-res logits go back in as the
    mask prompt: "logits" as they are (SAM-Med3D), "probabilities" after a sigmoid (SAM-Med2D),
    None not at all (MedSAM's point decoder, as trained). best_of_three: multimask output and
    the highest predicted IoU kept (SAM-Med2D)."""

    mask_feedback: Optional[str] = "logits"
    best_of_three: bool = False
    takes_box = False

    def decode(self, predictor, prompts: Prompts, previous: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        """(logits (B, 1, ...), IoU (B,)) for a batch of B point sets."""
        mask = None
        if previous is not None and self.mask_feedback is not None:
            # one previous mask (batch 1) serves every prompt set: the decoder encodes it once
            mask = previous if self.mask_feedback == "logits" else 1 / (1 + np.exp(-previous))
        logits, iou = predictor.predict(prompts["points"], prompts["labels"], mask_input=mask,
                                        multimask_output=self.best_of_three)
        return best_of(logits, iou)

    def members(self, prompts: Prompts, first_logits: np.ndarray, config: EnsembleConfig, model_size: int) -> Prompts:
        """The user's clicks plus points sampled inside and around the first mask, per member."""
        cell = model_size / first_logits.shape[-1]
        points, labels = sample_prompt_sets(first_logits[0, 0] > 0, prompts["points"][0], prompts["labels"][0], cell,
                                            config, xy=first_logits.ndim == 4)  # 2D points are (x, y)
        return {"points": points, "labels": labels}


@dataclass(frozen=True)
class BoxPrompt:
    """A box and nothing else (MedSAM, as trained)."""

    takes_box = True

    def decode(self, predictor, prompts: Prompts, previous: Optional[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        logits, iou = predictor.predict(boxes=prompts["boxes"])
        return best_of(logits, iou)

    def members(self, prompts: Prompts, first_logits: np.ndarray, config: EnsembleConfig, model_size: int) -> Prompts:
        """Boxes whose sides move out by up to 20 model pixels, as MedSAM's training jittered them."""
        return {"boxes": jittered_boxes(prompts["boxes"][0], config)}
