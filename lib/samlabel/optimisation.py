"""What the trainers' loops share (click fine-tuning, encoder distillation): the order of an
epoch's samples, and gradient accumulation."""

import numpy as np
import torch


def epoch_order(rng: np.random.Generator, samples: int, iterations: int) -> np.ndarray:
    """`iterations` sample indices: whole shuffled passes over the samples, cut to length."""
    return np.concatenate([rng.permutation(samples) for _ in range(-(-iterations // samples))])[:iterations]


class GradientAccumulation:
    """Each backward pass scaled by 1/steps, and an optimiser step after every `steps` of them;
    finish() steps on a last, partial group."""

    def __init__(self, optimizer: torch.optim.Optimizer, steps: int) -> None:
        self.optimizer, self.steps, self.passes = optimizer, steps, 0
        optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.steps).backward()
        self.passes += 1
        if self.passes % self.steps == 0:
            self._step()

    def finish(self) -> None:
        if self.passes % self.steps:
            self._step()

    def _step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
