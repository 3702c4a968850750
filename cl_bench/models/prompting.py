"""Per-sample prompt embeddings inserted into the language model's input sequence.

Prompt methods (L2P, ModalPrompt) learn embeddings that enter the sequence the language model
reads. ``attach_prompts(model, source)`` registers ``source`` as a submodule of ``model`` (so the
Trainer optimises its parameters inside the model's forward) and hooks the decoder stack:

- a forward pass that starts a sequence (training, scoring, the prefill of ``generate``) calls
  ``source(rows)`` for each row's prompt embeddings and inserts them right after the row's first
  attended token (its BOS), for right-padded training batches and left-padded generation batches
  alike; the attention mask and the position ids are extended to match, and the prompt positions
  are removed again from the decoder's outputs (last and all hidden states), so logits, labels and
  hidden states keep the positions of ``input_ids`` (labels need no fixing);
- each later decoding step (the KV cache holds the prompts) extends the mask and shifts the
  positions the same way.

A row whose prompt is unused (``RowPrompts.used`` False, e.g. an L2P row without an image) gets
masked prompt positions that shift nothing: it computes what the model computes without prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cl_bench.errors import CLBenchError

PROMPT_MODULE = "input_prompts"


@dataclass
class RowPrompts:
    """Each row's prompt embeddings (rows x P x D) and which rows use them (None: all)."""

    embeds: torch.Tensor
    used: torch.Tensor | None = None


@dataclass
class _Insertion:
    """Where the prompts of the running sequence sit: per-row column, per-row use, length."""

    columns: torch.Tensor
    used: torch.Tensor
    length: int


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack that reads ``inputs_embeds`` (``...language_model``)."""
    for name, module in model.named_modules():
        if name.endswith("language_model") and hasattr(module, "layers"):
            return module
    raise CLBenchError("model has no language_model decoder stack: is it a LLaVA model?")


def insertion_index(columns: torch.Tensor, width: int, length: int) -> torch.Tensor:
    """Gather index (rows x width+length) into ``cat([x, prompts], 1)`` that places each row's
    ``length`` prompt positions at its column."""
    j = torch.arange(width + length, device=columns.device).unsqueeze(0)
    c = columns.unsqueeze(1)
    return torch.where(j < c, j, torch.where(j < c + length, width + j - c, j - length))


def _insert(x: torch.Tensor, prompts: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``prompts`` placed into ``x`` along dim 1 by ``insertion_index``."""
    both = torch.cat([x, prompts.to(x)], dim=1)
    if both.ndim == 3:
        return both.gather(1, index.unsqueeze(-1).expand(-1, -1, both.shape[-1]))
    return both.gather(1, index)


class PromptInsertion:
    """The hooks that put ``source``'s prompts into ``model``'s sequences; ``remove()`` undoes."""

    def __init__(self, model: torch.nn.Module, source: torch.nn.Module) -> None:
        if hasattr(model, PROMPT_MODULE):
            raise CLBenchError("the model already carries input prompts")
        self.model, self.source = model, source
        model.add_module(PROMPT_MODULE, source)
        decoder = language_model(model)
        self._handles = [
            decoder.register_forward_pre_hook(self._before, with_kwargs=True),
            decoder.register_forward_hook(self._after, with_kwargs=True),
        ]
        self._running: _Insertion | None = None
        self._keep: torch.Tensor | None = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        delattr(self.model, PROMPT_MODULE)

    # -- hooks -------------------------------------------------------------------------------
    def _before(self, module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args or kwargs.get("inputs_embeds") is None:
            raise CLBenchError("input prompts need the decoder called with inputs_embeds= "
                               "(as LLaVA calls its language model)")
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        return args, self._prefill(kwargs) if past == 0 else self._decode(kwargs, past)

    def _prefill(self, kwargs: dict) -> dict:
        embeds = kwargs["inputs_embeds"]
        rows, width, _ = embeds.shape
        prompts = self.source(rows)
        length = prompts.embeds.shape[1]
        if prompts.embeds.shape[0] != rows:
            raise CLBenchError(f"prompts for {prompts.embeds.shape[0]} rows, batch of {rows}")
        device = embeds.device
        used = (torch.ones(rows, dtype=torch.long, device=device) if prompts.used is None
                else prompts.used.to(device=device, dtype=torch.long))
        mask = kwargs.get("attention_mask")
        leading_pads = (mask.cumsum(1) == 0).sum(1) if mask is not None else 0
        columns = torch.zeros(rows, dtype=torch.long, device=device) + leading_pads + 1
        index = insertion_index(columns, width, length)
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(width, device=device).unsqueeze(0)
        positions = positions.expand(rows, -1)
        after = torch.arange(width, device=device).unsqueeze(0) >= columns.unsqueeze(1)
        first = positions.gather(1, (columns - 1).unsqueeze(1))
        prompt_positions = first + 1 + torch.arange(length, device=device).unsqueeze(0)
        kwargs["inputs_embeds"] = _insert(embeds, prompts.embeds, index)
        kwargs["position_ids"] = _insert(positions + after * length * used.unsqueeze(1),
                                         prompt_positions, index)
        if mask is not None or not bool(used.all()):
            if mask is None:
                mask = torch.ones(rows, width, dtype=torch.long, device=device)
            kwargs["attention_mask"] = _insert(mask, used.unsqueeze(1).expand(-1, length), index)
        self._running = _Insertion(columns, used, length)
        self._keep = torch.arange(width, device=device).unsqueeze(0) + after * length
        return kwargs

    def _decode(self, kwargs: dict, past: int) -> dict:
        run = self._running
        embeds = kwargs["inputs_embeds"]
        rows, width = embeds.shape[:2]
        if run is None or run.columns.shape[0] != rows:
            raise CLBenchError("a decoding step without the prompted first pass of its sequence")
        positions = kwargs.get("position_ids")
        if positions is None:
            start = past - run.length
            positions = torch.arange(start, start + width, device=embeds.device).unsqueeze(0)
        kwargs["position_ids"] = positions + run.length * run.used.unsqueeze(1)
        mask = kwargs.get("attention_mask")
        if mask is not None or not bool(run.used.all()):
            seen = past - run.length + width
            if mask is None:
                mask = torch.ones(rows, seen, dtype=torch.long, device=embeds.device)
            index = insertion_index(run.columns, seen, run.length)
            kwargs["attention_mask"] = _insert(
                mask, run.used.unsqueeze(1).expand(-1, run.length), index)
        return kwargs

    def _after(self, module, args: tuple, kwargs: dict, output):
        keep, self._keep = self._keep, None
        if keep is None:
            return output
        index = keep.unsqueeze(-1).expand(-1, -1, output.last_hidden_state.shape[-1])
        output.last_hidden_state = output.last_hidden_state.gather(1, index)
        if getattr(output, "hidden_states", None) is not None:
            output.hidden_states = tuple(h.gather(1, index) for h in output.hidden_states)
        return output


def attach_prompts(model: torch.nn.Module, source: torch.nn.Module) -> PromptInsertion:
    """Insert ``source(rows) -> RowPrompts`` into every sequence ``model`` reads (module doc)."""
    return PromptInsertion(model, source)


def vocabulary_embeddings(model: torch.nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """fp32 copies of randomly drawn token embeddings (global RNG), shaped ``shape + (D,)``:
    prompt initialisation at the language model's own embedding scale."""
    table = model.get_input_embeddings().weight
    ids = torch.randint(0, table.shape[0], shape)
    return table.detach()[ids.to(table.device)].float().clone()
