"""GEM: Gradient Episodic Memory (Lopez-Paz & Ranzato, NeurIPS 2017) on one carried LoRA.

After each stage an episodic memory of ``memory_per_task`` of its training samples is kept. At
every optimizer step of a later stage, the gradient g_k of the loss on (a batch of) each earlier
task's memory is computed at the current parameters; if the step's gradient g has a negative
inner product with any g_k, it is replaced by the closest vector (in L2) that has none: GEM's
QP (eq. 10), solved through its dual (eq. 11),
``min_v 1/2 v^T G G^T v + g^T G^T v  s.t.  v >= gamma``, then ``g~ = G^T v + g``, with G the
matrix of the g_k and gamma the margin (``memory_strength``). Only the trainable parameters (the
LoRA factors and the projector) take part; their gradients are flattened once per step into
fp32 buffers on their device. The model trains as ``seq_lora``. Checked against
facebookresearch/GradientEpisodicMemory ``model/gem.py`` (``project2cone2``: quadprog on the
dual with P = G G^T, q = -G g, v >= margin; ``observe``: one gradient per past task on its whole
memory, projection only when a dot product is negative) and ``run_experiments.sh`` (256
memories per task, memory_strength 0.5). Continual-NExT's GEM (``swift/trainers/trainers.py``)
is not this algorithm: it pools all memories into one gradient and minimises a penalty with
L-BFGS instead of solving the QP.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from cl_bench.errors import CLBenchError
from cl_bench.method import MethodContext, Stage
from cl_bench.models.batching import training_batches
from cl_bench.registry import register_method
from methods.seq_lora import SeqLoRA, trainable_parameters


@dataclass
class GEMOptions:
    """GEM options (defaults: the GEM paper's code, ``run_experiments.sh``)."""

    memory_per_task: int = 256
    """Training samples kept in each task's episodic memory (GEM: n_memories = 256)."""
    memory_strength: float = 0.5
    """gamma, the margin of the dual's constraint v >= gamma (GEM: memory_strength = 0.5; 0 is
    the plain projection, larger values favour backward transfer)."""
    memory_batch_size: int | None = None
    """Memory samples per earlier task whose gradient each step computes, drawn (seeded) from
    its memory; None: train.batch_size. GEM's code uses the whole memory at every step
    (set it to memory_per_task for that), which at MLLM scale costs that many extra forward and
    backward passes per earlier task and step."""

    def __post_init__(self) -> None:
        problems = []
        if self.memory_per_task < 1:
            problems.append(f"method.memory_per_task={self.memory_per_task}: must be >= 1")
        if not self.memory_strength >= 0:
            problems.append(f"method.memory_strength={self.memory_strength}: must be >= 0")
        if self.memory_batch_size is not None and self.memory_batch_size < 1:
            problems.append(f"method.memory_batch_size={self.memory_batch_size}: must be >= 1")
        if problems:
            raise CLBenchError("; ".join(problems))


# -- GEM's QP -------------------------------------------------------------------------------------
def solve_dual(gram: torch.Tensor, linear: torch.Tensor, margin: float) -> torch.Tensor:
    """argmin_v 1/2 v^T P v + q^T v s.t. v >= margin, for a positive semi-definite P (t x t):
    with u = v - margin, Lawson and Hanson's active-set NNLS in Gram form (exact, fp64)."""
    P, q = gram.double(), linear.double()
    t = P.shape[0]
    d = -(q + P @ torch.full((t,), margin, dtype=P.dtype, device=P.device))  # -grad at u = 0
    u = torch.zeros_like(d)
    passive = torch.zeros(t, dtype=torch.bool, device=P.device)
    tol = 1e-10 * max(1.0, float(P.diagonal().abs().max()))
    for _ in range(3 * t + 3):
        w = d - P @ u  # the negative gradient: a passive-free coordinate with w > 0 enters
        if passive.all() or float(w.masked_fill(passive, -1.0).max()) <= tol:
            break
        passive[int(w.masked_fill(passive, -float("inf")).argmax())] = True
        for _ in range(t + 1):  # each pass drops at least one passive coordinate
            s = torch.zeros_like(u)
            idx = passive.nonzero().squeeze(1)
            s[idx] = torch.linalg.lstsq(P[idx][:, idx], d[idx].unsqueeze(1)).solution.squeeze(1)
            if bool((s[idx] > tol).all()):
                u = s
                break
            blocking = passive & (s <= tol)
            step = (u[blocking] / (u[blocking] - s[blocking])).min()
            u = u + step * (s - u)
            passive &= u > tol
            u = u.masked_fill(~passive, 0.0)
    return u + margin


def project_gradient(gradient: torch.Tensor, memories: torch.Tensor,
                     margin: float) -> torch.Tensor:
    """GEM eq. 10-11: ``g~ = G^T v + g`` with v the dual's solution for P = G G^T, q = G g
    (``memories``: G, one earlier task's gradient per row; fp32 in, fp32 out)."""
    G = memories.double()
    v = solve_dual(G @ G.T, G @ gradient.double(), margin)  # GEM eq. 11 (project2cone2)
    return (G.T @ v + gradient.double()).to(gradient.dtype)


def violates(gradient: torch.Tensor, memories: torch.Tensor) -> bool:
    """Whether g has a negative inner product with any earlier task's gradient (GEM eq. 8)."""
    return bool(((memories @ gradient) < 0).any())


class FlatGradients:
    """The gradients of fixed parameters, flattened into (and back from) one fp32 vector."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        self.size = sum(p.numel() for p in params)

    def read(self, out: torch.Tensor) -> torch.Tensor:
        """Copy every parameter's gradient (0 where none) into ``out``; returns it."""
        start = 0
        for p in self.params:
            n = p.numel()
            if p.grad is None:
                out[start : start + n].zero_()
            else:
                out[start : start + n].copy_(p.grad.reshape(-1))
            start += n
        return out

    def write(self, flat: torch.Tensor) -> None:
        """Set every parameter's gradient from ``flat`` (in the gradient's dtype)."""
        start = 0
        for p in self.params:
            n = p.numel()
            value = flat[start : start + n].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = value.clone()
            else:
                p.grad.copy_(value)
            start += n


@register_method(
    "gem",
    paper="GEM (Lopez-Paz & Ranzato, NeurIPS 2017), eq. 10-11; a baseline of Continual-NExT",
    trains="one LoRA on the language model + the projector, carried across stages "
           "(as seq_lora), each step's gradient projected against the earlier tasks' memories",
    growth="memory_per_task training samples per task (by reference) and, while training, one "
           "fp32 gradient of the trainable parameters per earlier task",
    launchers=("single",),  # the projection needs the whole step's gradient on one process
)
class GEM(SeqLoRA):
    """GEM: sequential LoRA whose steps never raise an earlier task's memory loss (first order).

    Each optimizer step's gradient is projected by GEM's QP when it conflicts with one."""

    Options = GEMOptions

    def __init__(self, options: GEMOptions, context: MethodContext) -> None:
        super().__init__(options, context)
        self.memories: list[list[tuple[str, int]]] = []  # per earlier stage: (task, sample index)
        self.flat: FlatGradients | None = None
        self.stage_index = 0
        self.steps = 0
        self.projected = 0

    def before_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        cfg = self.context.config
        if cfg.train.deepspeed:
            raise CLBenchError("GEM changes each step's gradient before the optimizer step, "
                               "which DeepSpeed takes inside the backward: run it without "
                               "train.deepspeed (launcher: single)")
        if torch.distributed.is_available() and torch.distributed.is_initialized() and \
                torch.distributed.get_world_size() > 1:
            raise CLBenchError("GEM runs on one process only (launcher: single)")
        model = super().before_stage(model, stage)
        self.flat = FlatGradients(list(trainable_parameters(model).values()))
        self.stage_index, self.steps, self.projected = stage.index, 0, 0
        return model

    def before_optimizer_step(self, model: torch.nn.Module) -> None:
        """Project the step's gradient if it conflicts with an earlier task's memory gradient."""
        if not self.memories:
            return
        self.steps += 1
        device = self.flat.params[0].device
        current = self.flat.read(torch.empty(self.flat.size, device=device))
        memories = torch.empty(len(self.memories), self.flat.size, device=device)
        for k, memory in enumerate(self.memories):
            model.zero_grad(set_to_none=True)
            model(**self._memory_batch(memory, k, device)).loss.backward()
            self.flat.read(memories[k])  # g_k at the current parameters (GEM observe)
        if violates(current, memories):
            current = project_gradient(current, memories, self.options.memory_strength)
            self.projected += 1
        model.zero_grad(set_to_none=True)
        self.flat.write(current)

    def _memory_batch(self, memory: list[tuple[str, int]], task: int,
                      device: torch.device) -> dict:
        size = self.options.memory_batch_size or self.context.config.train.batch_size
        rng = random.Random(f"gem:{self.context.config.seed}:{self.stage_index}:"
                            f"{self.steps}:{task}")
        picked = sorted(rng.sample(range(len(memory)), min(size, len(memory))))
        samples = [self.context.train_sample(*memory[i]) for i in picked]
        return next(training_batches(samples, self.context.bundle, len(samples),
                                     self.context.config.train.max_length, device))

    def after_stage(self, model: torch.nn.Module, stage: Stage) -> torch.nn.Module:
        """Keep a seeded sample of the stage's training samples as its episodic memory."""
        pool = [(task.name, i) for task in stage.tasks
                for i in range(len(self.context.train_samples(task)))]
        rng = random.Random(f"gem-memory:{self.context.config.seed}:{stage.index}")
        self.memories.append(sorted(rng.sample(pool, min(self.options.memory_per_task,
                                                         len(pool)))))
        self.flat = None
        return super().after_stage(model, stage)

    def after_evaluation(self, stage: Stage) -> dict:
        return {"projected_steps": self.projected, "steps": self.steps}

    def state(self) -> dict:
        """The memories and, mid-stage, the step counters that seed each step's memory batch."""
        return {"memories": [[list(item) for item in memory] for memory in self.memories],
                "steps": self.steps, "projected": self.projected}

    def load_state(self, state: dict) -> None:
        self.memories = [[(str(task), int(i)) for task, i in memory]
                         for memory in state.get("memories", [])]
        self.steps, self.projected = state.get("steps", 0), state.get("projected", 0)
