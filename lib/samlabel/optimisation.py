"""What the trainers' loops share (click fine-tuning, encoder distillation): the order of an
epoch's samples, gradient accumulation, and denormal floats flushed to zero."""

from contextlib import contextmanager

import numpy as np
import torch


@contextmanager
def denormals_flushed():
    """Denormal floats flushed to zero on the CPU for the block (also usable as a decorator). A
    decoder that still predicts all background makes them in its backward pass, and x86 CPUs take
    over 100 times longer on them: a click fine-tuning epoch of bench/bench_teacher_student.py took
    137 s, and 0.8 s flushed, with the same results."""
    flushed = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if flushed:
            torch.set_flush_denormal(False)


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
