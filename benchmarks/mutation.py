"""Mutation testing: plant one known bug at a time in a scratch copy of the repository, run the
tests that should catch it, and print the share of bugs caught (killed) per module.

Not part of CI: a full pass runs every module's tests once per bug (hours on 2 shared cores).
Run it before closing an issue that touches metrics, consolidation, a method's core term or
defaults, scoring, generation, resume or the alpha sweep; a new bug class worth fearing is one
more ``Mutant`` line below.

    python benchmarks/mutation.py                    # every module
    python benchmarks/mutation.py --module metrics   # some modules (repeatable)
    python benchmarks/mutation.py --list             # the planted bugs, nothing run
    python benchmarks/mutation.py --json out.json    # also write the results

Each mutant replaces one exact piece of text (it must occur exactly once in its file) and must
still parse; one that no longer fits the code (the code was rewritten) is reported STALE with
the reason, left out of the kill rates, and makes the script (and ``--list``) exit non-zero,
while the other mutants still run. The copy is taken from the working tree (tracked and
untracked files, not ignored ones), so uncommitted changes are tested too. A module's tests must
pass on the unmutated copy.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    """One planted bug: ``find`` (exactly once in ``path``) becomes ``replace``."""

    path: str
    find: str
    replace: str
    bug: str


@dataclass(frozen=True)
class Module:
    """A group of bugs and the pytest arguments whose tests should catch them."""

    name: str
    tests: tuple[str, ...]
    mutants: tuple[Mutant, ...]


def mutants(path: str, *triples: tuple[str, str, str]) -> tuple[Mutant, ...]:
    return tuple(Mutant(path, find, replace, bug) for find, replace, bug in triples)


ALPHA_REGIONS = mutants(
    "reports/alpha_regions.py",
    ("    end = next((i for i, ok in enumerate(general_ok) if not ok), len(xs)) - 1",
     "    end = max(i for i, ok in enumerate(general_ok) if ok)",
     "the General-stable region jumps over a dip (not its first miss)"),
    ("    task_ok = holds(ts, ts[-1], ts[0], tolerance)",
     "    task_ok = holds(ts, ts[-1], 0.0, tolerance)",
     "the task swing is measured from zero, not from alpha 0's score"),
    ("        if self.task_stable_start <= self.general_stable_end:",
     "        if self.task_stable_start < self.general_stable_end:",
     "an Ideal region of one alpha is dropped"),
    ('    grouped = pd.concat(frames).groupby(["label", "alpha"], sort=False)',
     '    grouped = pd.concat(frames[:1]).groupby(["label", "alpha"], sort=False)',
     "only the first sweep of a label is averaged"),
)

METRICS = mutants(
    "cl_bench/metrics.py",
    ("as_matrix(matrix)[-1].mean()", "as_matrix(matrix)[-2].mean()",
     "Last reads the row before the final one"),
    ("arr[j + 1 :, j].mean()", "arr[j:, j].mean()",
     "Avg counts the stage before the task was learned"),
    ("np.diagonal(arr[1:]).mean()", "np.diagonal(arr[:-1]).mean()",
     "MFT reads the diagonal one stage early"),
    ("arr[t, :t].mean()", "arr[t, : t + 1].mean()", "MAA counts a task not learned yet"),
    ("for t in range(1, tasks + 1)])", "for t in range(1, tasks)])", "MAA drops the last stage"),
    ("arr[tasks, j] - arr[j + 1, j] for j in range(tasks - 1)",
     "arr[j + 1, j] - arr[tasks, j] for j in range(tasks - 1)", "BWT with the sign flipped"),
    ("arr[tasks, j] - arr[j + 1, j] for j in range(tasks - 1)",
     "arr[tasks, j] - arr[j + 1, j] for j in range(tasks)", "BWT counts the last task too"),
    ("arr[j + 1 : tasks, j].max()", "arr[0:tasks, j].max()",
     "Forgetting counts the scores before the task was learned"),
    ("arr[j, j] - arr[0, j]", "arr[j + 1, j] - arr[0, j]",
     "FWT reads the score after learning the task"),
    ("Forgetting=_mean(forgetting(matrix))", "Forgetting=max(forgetting(matrix), default=None)",
     "Forgetting is the worst task's, not the mean"),
    ("return arr.shape[0] == arr.shape[1] + 1", "return arr.shape[0] >= arr.shape[1]",
     "a square (multitask) matrix counts as continual"),
)

CONSOLIDATION = mutants(
    "methods/llava_c/consolidation.py",
    ("return alpha * delta  # LLaVA-c eq. 4", "return delta  # LLaVA-c eq. 4",
     "ModelMix ignores alpha"),
    ("upper = torch.clamp(ks, max=r - 1)", "upper = torch.clamp(ks - 1, min=0)",
     "the k search sums k singular values instead of k + 1"),
    ("err = (means - alpha * s64[0]) ** 2", "err = (means - alpha * s64[-1]) ** 2",
     "the k search targets alpha * s_r instead of alpha * s_1"),
    ("return int(torch.argmin(err)) + 1",
     "return int(len(err) - 1 - torch.argmin(err.flip(0))) + 1", "ties go to the largest k"),
    ('fill = s64[-1] if boundary == "pad" else s64.new_zeros(())', "fill = s64.new_zeros(())",
     "boundary=pad pads with zeros (as truncate)"),
    ("scaled = (csum[idx + k + 1] - csum[idx]) / k",
     "scaled = (csum[idx + k + 1] - csum[idx]) / (k + 1)",
     "the window of k + 1 values is divided by k + 1, not k"),
    ("rebuilt = (u * s_new) @ vh", "rebuilt = (u * s) @ vh",
     "the full-SVD path rebuilds the raw update"),
    ("if delta.ndim < 2:\n        return modelmix_delta(delta, alpha)",
     "if delta.ndim < 2:\n        return delta.clone()", "biases and norms are not scaled"),
    ("core = scaling * (rb.to(torch.float64)", "core = (rb.to(torch.float64)",
     "the factored path drops the LoRA scaling"),
    ("full = torch.cat([spectrum.s, spectrum.s.new_zeros(r - p)])", "full = spectrum.s",
     "the factored path searches k over q values instead of min(M, N)"),
    ("if not 0.0 <= float(alpha) <= 1.0:", "if not 0.0 <= float(alpha) <= 2.0:",
     "alpha above 1 is accepted"),
)

LLAVA_C = mutants(
    "methods/llava_c/method.py",
    ("alpha: float = 0.2", "alpha: float = 0.3", "default alpha 0.3 instead of the paper's 0.2"),
    ('consolidation: str = "sac"', 'consolidation: str = "modelmix"',
     "default consolidation ModelMix instead of SAC"),
    ('uir: str = "mse"', 'uir: str = "l2"', "default UIR distance L2 instead of MSE"),
    ("with torch.no_grad(), model.disable_adapter():\n            previous = model(",
     "with torch.no_grad():\n            previous = model(",
     "UIR's previous model is the current one (never regularises)"),
    ("current.hidden_states[-1], previous.hidden_states[-1]",
     "current.hidden_states[0], previous.hidden_states[0]",
     "UIR compares the embeddings, not the final hidden states"),
    ("apply_delta(plain, delta, lambda u: self.consolidation(u)(None), base=self.before)",
     "apply_delta(plain, delta, lambda u: self.consolidation(u)(None))",
     "the projector's consolidated update lands on its trained value"),
    ("plain = model.unload()", "plain = model.merge_and_unload()",
     "the LoRA is merged in full, then its consolidated update added again"),
    ("return diff.pow(2).sum() / (m.sum() * current.shape[-1])",
     "return diff.pow(2).sum() / m.sum()",
     "the MSE is not divided by the hidden size"),
    ("per_token = (log_p.exp() * (log_p - log_q)).sum(-1)",
     "per_token = (log_q.exp() * (log_q - log_p)).sum(-1)", "FKL computes the reverse KL"),
    ('if self.options.uir in ("mse", "l2", "fkl"):', 'if self.options.uir in ("mse", "l2"):',
     "the FKL ablation trains without its term"),
    ("return samples + self.replay if", "return samples if",
     "the data-replay ablation trains without the replayed inquiries"),
) + mutants(
    "methods/llava_c/variants.yaml",
    ("options: {consolidation: modelmix, uir: none}", "options: {consolidation: sac, uir: none}",
     "modelmix consolidates with SAC"),
    ("options: {uir: none}", "options: {uir: mse}", "llava_c_sac trains with UIR"),
    ("options: {consolidation: none}", "options: {consolidation: modelmix}",
     "llava_c_uir mixes its updates"),
    ("options: {uir: replay}", "options: {uir: none}", "llava_c_replay replays nothing"),
    ("options: {uir: fkl}", "options: {uir: mse}", "llava_c_fkl regularises with MSE"),
)

HIDE = mutants(
    "methods/hide_llava/routing.py",
    ("torch.softmax(combined / temperature, dim=-1)",
     "torch.softmax(combined * temperature, dim=-1)",
     "the routing softmax multiplies by T"),
    ("both = image_weight * image_sims + text_weight * text_sims",
     "both = text_weight * image_sims + image_weight * text_sims",
     "the image and text weights are swapped"),
) + mutants(
    "cl_bench/models/routed_lora.py",
    ("total = total + d[:, c].view(shape)", "total = total + d[:, 0].view(shape)",
     "every routed LoRA expert gets the first task's weight"),
    ("d[:, c].to(x.dtype).view(shape)", "d[:, 0].to(x.dtype).view(shape)",
     "every routed projector gets the first task's weight"),
) + mutants(
    "methods/hide_llava/options.py",
    ("temperature: float = 0.1", "temperature: float = 0.2", "default temperature 0.2, not 0.1"),
    ("image_weight: float = 0.5", "image_weight: float = 0.7", "default image weight 0.7"),
    ("fusion_weight: float = 1.0", "fusion_weight: float = 0.5", "default fusion weight 0.5"),
    ('"hide": ("expand", "merge"),', '"hide": ("merge", "expand"),',
     "HiDe routes the lower layers and fuses the top"),
) + mutants(
    "methods/hide_llava/method.py",
    ("self._anchors([e.text_anchor for e in self.experts])",
     "self._anchors([e.image_anchor for e in self.experts])",
     "questions are compared with the image anchors"),
    ("self.routing.weights = d.to(device_of(model))",
     "self.routing.weights = d.flip(1).to(device_of(model))",
     "the routing weights go to the wrong experts"),
    ("expert.text_anchor = means.text", "expert.text_anchor = means.image",
     "the text anchor is the image features' mean"),
    ("self.experts = [e for e in self.experts if e.stage < stage.index] + [expert]",
     "self.experts = [expert]", "a stage forgets the earlier experts"),
) + mutants(
    "methods/hide_llava/fusion.py",
    ("B = torch.cat([weight * f.scaling * f.B.float() for f in experts], dim=1)",
     "B = torch.cat([weight * f.B.float() for f in experts], dim=1)",
     "the fused LoRA drops each LoRA's scaling"),
) + mutants(
    "methods/hide_llava/assembly.py",
    ("top if layer_index(model, n) >= n_layers - top_layers else rest",
     "top if layer_index(model, n) > n_layers - top_layers else rest",
     "no layer counts as the top one"),
) + mutants(
    "methods/hide_llava/variants.yaml",
    ("options: {image_weight: 1.0, text_weight: 0.0}",
     "options: {image_weight: 0.0, text_weight: 1.0}", "hide_llava_image routes on text"),
)

BASELINES = mutants(
    "methods/lwf.py",
    ("temperature: float = 2.0", "temperature: float = 1.0", "LwF default T 1, not 2"),
    ("weight: float = 1.0", "weight: float = 0.5", "LwF default weight 0.5, not 1"),
    ("self.teacher = {n: p.detach().clone() for n, p", "self.teacher = {n: p.detach() for n, p",
     "LwF's teacher is the live student"),
    ("return (log_p.exp() * (log_p - log_q)).sum(-1).mean()",
     "return (log_q.exp() * (log_q - log_p)).sum(-1).mean()", "LwF computes the reverse KL"),
    ('answer = inputs["labels"][:, 1:] != IGNORE_INDEX',
     'answer = inputs["labels"][:, :-1] != IGNORE_INDEX', "LwF distils positions shifted by one"),
) + mutants(
    "methods/ewc.py",
    ("ewc_lambda: float = 1.0", "ewc_lambda: float = 2.0", "EWC default lambda 2, not 1"),
    ("fisher_batch_size: int = 1", "fisher_batch_size: int = 2",
     "EWC's default Fisher squares pair means, not per-sample gradients"),
    ("fisher[name] += p.grad.float().pow(2)", "fisher[name] += p.grad.float().abs()",
     "the Fisher sums absolute, not squared, gradients"),
    ("return strength / 2 * total", "return strength * total", "the EWC penalty lacks its 1/2"),
    ("self.fisher[name] = self.fisher[name] + value if name in self.fisher else value",
     "self.fisher[name] = value", "the Fisher is replaced each stage, not accumulated"),
    ("self.anchor = {name: p.detach().clone() for name, p",
     "self.anchor = {name: p.detach() for name, p",
     "EWC's anchor is the live parameter (no penalty)"),
) + mutants(
    "methods/olora.py",
    ("orth_lambda: float = 0.05", "orth_lambda: float = 0.5", "O-LoRA default lambda 0.5"),
    ('orth_norm: str = "l1"', 'orth_norm: str = "squared"', "O-LoRA default norm squared"),
    ("overlap = new.float() @ old.float().T", "overlap = new.float() @ new.float().T",
     "the new A is compared with itself"),
    ("activate_adapters(model, self.names, [name])",
     "activate_adapters(model, self.names, self.names)",
     "the earlier LoRAs keep training"),
) + mutants(
    "methods/replay.py",
    ("buffer_size: int = 1000", "buffer_size: int = 4", "replay default buffer of 4"),
    ("ratio: float = 1.0", "ratio: float = 0.5", "replay default ratio 0.5"),
    ("slot = draws.randrange(seen + 1)", "slot = draws.randrange(seen)",
     "Algorithm R draws from the wrong range"),
    ("own = super().training_samples(stage)\n        return own + self.replayed(stage, len(own))",
     "own = super().training_samples(stage)\n        return own",
     "nothing is replayed"),
) + mutants(
    "methods/seq_lora.py",
    ('"""Nothing is merged: the LoRA stays a LoRA."""\n        return model',
     '"""Nothing is merged: the LoRA stays a LoRA."""\n        return model.merge_and_unload()',
     "seq_lora merges its LoRA"),
)

BOUNDS = mutants(
    "methods/zeroshot.py",
    ("        return []", "        return [Stage(1, tuple(tasks))]", "zeroshot trains"),
) + mutants(
    "methods/multitask.py",
    ("return [Stage(1, tuple(tasks))]", "return [Stage(i + 1, (t,)) for i, t in enumerate(tasks)]",
     "multitask trains sequentially"),
    ("return [Stage(1, tuple(tasks))]", "return [Stage(1, tuple(tasks[:1]))]",
     "multitask trains on the first task only"),
) + mutants(
    "methods/finetune.py",
    ("class FineTune(Method):",
     "class FineTune(Method):\n    def after_stage(self, model, stage):\n"
     "        return model.unload()", "finetune drops its LoRA instead of merging it"),
)

SCORING = mutants(
    "tasks/scoring.py",
    ('    """Stripped, upper-cased and equal (the reference code behind the published UCIT '
     'numbers)."""\n    pred = pred.strip().upper()',
     '    """Stripped, upper-cased and equal (the reference code behind the published UCIT '
     'numbers)."""\n    pred = pred.upper()', "exact matching does not strip the prediction"),
    ("return bool(pred) and pred in gt.strip().upper()",
     "return bool(pred) and gt.strip().upper() in pred", "pred_in_gt tests the other way round"),
    ("return min(matches / 3, 1.0) if", "return min(matches / 2, 1.0) if",
     "VQA accuracy counts 2 humans as enough"),
    ("else float(matches > 0)", "else float(matches > 1)",
     "a single-reference VQA answer is never right"),
    ("if iou(box, ref_box) > 0.5:", "if iou(box, ref_box) >= 0.5:", "IoU of exactly 0.5 counts"),
    ("(b[3] - b[1]) - inter", "(b[3] - b[1])", "the union counts the intersection twice"),
    ("return chr(65 + index) if", "return chr(66 + index) if", "option index 0 is read as B"),
    ("score = 100.0 * math.fsum(per_sample.values()) / len(per_sample)",
     "score = 100.0 * math.fsum(per_sample.values()) / (len(per_sample) + 1)",
     "the mean over questions has one question too many"),
    ("TaskScore(sum(worked) / len(worked),", "TaskScore(max(worked),",
     "the caption score is the best metric, not the mean"),
    ("word = word.strip(\".,;:!?\\\"'()[]\")", "word = word",
     "yes/no keeps the punctuation of the first word"),
    ("return phrased.pop() if len(phrased) == 1 else None", "return phrased.pop()",
     "an answer naming two options counts as one"),
    ("    if missing:\n", "    if False:\n", "missing predictions are not reported"),
    ('is_word = m.group(2) in ("A", "I") and', "is_word = False and",
     "the article 'A' is read as option A"),
)

GENERATION = mutants(
    "cl_bench/evaluation/generation.py",
    ("mask = torch.arange(width).unsqueeze(0) >= (width - lengths).unsqueeze(1)",
     "mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)",
     "generation batches are right padded"),
    ('batch = {"input_ids": input_ids, "attention_mask": mask.long()}',
     'batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}',
     "padding is attended to"),
    ("images = [self._image(row) for row in rows]",
     "images = [self._image(row) for row in rows[::-1]]",
     "a batch's images go to other rows"),
    ("eos_token_id=tok.eos_token_id,", "eos_token_id=None,", "generation does not stop at EOS"),
    ('tokens.append(out[:, batch["input_ids"].shape[1] :].cpu())',
     'tokens.append(out[:, batch["input_ids"].shape[1] - 1 :].cpu())',
     "the answer includes the prompt's last token"),
    ("skip_special_tokens=True", "skip_special_tokens=False", "answers keep EOS and padding"),
    ("do_sample=False", "do_sample=True", "generation samples instead of greedy decoding"),
    ("texts = [text.strip() for text in decoded]", "texts = decoded",
     "answers keep their leading space"),
    ("max_new_tokens=max_new_tokens,", "max_new_tokens=2,", "answers are cut at 2 tokens"),
    ("        rows += batch_rows\n", "        rows += sorted(batch_rows)\n",
     "the input order is not restored within a length-sorted batch"),
    ("key=lambda i: (-lengths[i], i))", "key=lambda i: (lengths[i], i))",
     "batches are sorted shortest first (an out-of-memory batch fails last)"),
    ("for start in range(0, len(order), batch_size)]",
     "for start in range(0, len(order) - 1, batch_size)]",
     "the last row is dropped when it starts a batch of its own"),
    ("(prompts[row][0], image)", "(prompts[0][0], image)",
     "the method hook sees the first prompt's question for every row"),
) + mutants(
    "cl_bench/evaluation/sharding.py",
    ("return list(batches[rank::size])", "return list(batches[rank * size :: size])",
     "the ranks are dealt batches that overlap"),
    ("    if across_ranks and world()[1] > 1:\n", "    if False:\n",
     "each rank keeps only its own rows (no gather)"),
)

RESUME = mutants(
    "cl_bench/running/runner.py",
    ("model = method.load(folder.checkpoint(trained))", "pass",
     "resume restarts from the starting model"),
    ("for stage in stages[done - 1 if done else 0 :]:",
     "for stage in stages[done if done else 0 :]:",
     "resume skips the interrupted stage"),
    ("done = len(folder.records())", "done = max(len(folder.records()) - 1, 0)",
     "resume redoes the last finished stage"),
    ("    if previous.exists():\n        shutil.rmtree(previous)", "    pass",
     "older checkpoints are never deleted"),
) + mutants(
    "cl_bench/method.py",
    ('(folder / "method_state.json").write_text(json.dumps(self.state()))',
     '(folder / "method_state.json").write_text("{}")', "the method state is not saved"),
    ("ctx.trained |= load_model_state(ctx.bundle.model, folder, ctx.bundle.path)", "pass",
     "resume loads the starting model, not the checkpoint"),
) + mutants(
    "cl_bench/running/run_folder.py",
    ('if (path / "records.jsonl").exists():', "if False:",
     "a new run overwrites a finished one"),
) + mutants(
    "methods/hide_llava/method.py",
    ('self.experts = load_experts(folder / "hide_llava")', "self.experts = []",
     "HiDe-LLaVA resumes without its experts"),
) + mutants(
    "methods/olora.py",
    ('self.names = list(state.get("adapters", []))', "self.names = []",
     "O-LoRA resumes without its earlier adapters' names"),
)

SWEEP = mutants(
    "cl_bench/analysis/sweep.py",
    ("apply_delta(model, delta, lambda u: run_method.consolidation(u)(None))",
     "apply_delta(model, delta, lambda u: u.product() if hasattr(u, 'product') else u)",
     "earlier stages are rebuilt from raw, unconsolidated updates"),
    ("        restore(model, before_swept)\n", "",
     "each alpha starts from the previous alpha's model"),
    ("run_method, swept = spec.cls(run_options, ctx), spec.cls(swept_options, ctx)",
     "run_method, swept = spec.cls(run_options, ctx), spec.cls(run_options, ctx)",
     "the sweep ignores the options given for it"),
    ("params[name].copy_(value)", "pass", "the projector is not restored between alphas"),
)

PROMPTS = mutants(
    "methods/l2p.py",
    ("pool_size: int = 10", "pool_size: int = 12", "L2P default pool of 12, not 10"),
    ("top_n: int = 5", "top_n: int = 4", "L2P default N = 4, not 5"),
    ("prompt_length: int = 5", "prompt_length: int = 4", "L2P default L_p = 4, not 5"),
    ("key_weight: float = 0.5", "key_weight: float = 0.1", "L2P default lambda 0.1, not 0.5"),
    ("best, index = sims.topk(top_n, dim=1)",
     "best, index = sims.topk(top_n, dim=1, largest=False)",
     "L2P selects the farthest keys"),
    ("distance = (1 - selected_sims).sum(1)", "distance = (1 - selected_sims).mean(1)",
     "the key loss averages, not sums, over the N selected keys"),
    ("embeds = self.prompts[index].flatten(1, 2)",
     "embeds = self.prompts[index.flip(1)].flatten(1, 2)",
     "the selected prompts are inserted farthest first"),
    ('return {"l2p_keys": self.options.key_weight * self.pool.distance}',
     'return {"l2p_keys": self.pool.distance}', "the key loss ignores lambda"),
    ("        self.insertion.remove()\n        self.insertion = None\n        return model",
     "        return model", "the prompts stay attached to the model after a stage"),
) + mutants(
    "cl_bench/models/encoders.py",
    ("return tower(pixel_values=pixels).pooler_output.float()",
     "return tower(pixel_values=pixels).last_hidden_state.mean(1).float()",
     "L2P's query is the mean patch feature, not the [CLS] one"),
) + mutants(
    "methods/modalprompt/options.py",
    ("prompt_length: int = 10", "prompt_length: int = 8", "ModalPrompt default 8 tokens, not 10"),
    ("top_k: int = 3", "top_k: int = 2", "ModalPrompt default top 2, not 3"),
    ("image_weight: float = 0.5", "image_weight: float = 0.7",
     "ModalPrompt default lambda 0.7, not 0.5"),
) + mutants(
    "methods/modalprompt/prompts.py",
    ("return transform(prompt).mean(0)", "return transform(prompt)[0]",
     "the prototype is the first token's projection, not the mean"),
    ("both = image_weight * image + (1 - image_weight) * text",
     "both = image_weight * text + (1 - image_weight) * image", "lambda weighs the text"),
    ("return guide.topk(n, dim=1).indices.flip(1)", "return guide.topk(n, dim=1).indices",
     "the nearest prompt is inserted first, not next to the text"),
    ("min(self.top_k - 1, current))", "min(self.top_k, current))",
     "training inserts top_k earlier prompts besides the current one"),
    ("return text + 1 - cosine_similarity(features.image[rows], target, dim=-1).mean()",
     "return text", "the alignment loss ignores the images"),
)

MOELORA = mutants(
    "methods/moelora.py",
    ("RANK_PER_EXPERT = 3", "RANK_PER_EXPERT = 2", "default rank 2 per expert, not 3"),
    ("return (self.options.alpha or 2 * self.rank) / self.rank",
     "return (self.options.alpha or self.rank) / self.rank", "default alpha r, not 2 r"),
    ("self.experts = self.options.experts or len(stages)",
     "self.experts = self.options.experts or 2", "default E = 2, not one per stage"),
    ("        if not expert_layers(model):\n            wrap_linears(",
     "        if True:\n            wrap_linears(",
     "every stage wraps fresh experts (nothing trained on)"),
) + mutants(
    "cl_bench/models/moe_lora.py",
    ("return torch.softmax(x.float() @ self.router.T, dim=-1)",
     "return torch.softmax(x.float() @ self.router.T, dim=0)", "the gates normalise over tokens"),
    ("h = self.expert_inputs(x) * self.gates(x).unsqueeze(-1)",
     "h = self.expert_inputs(x) / self.experts", "the experts are averaged, not routed"),
)

DISCO = mutants(
    "methods/disco.py",
    ("temperature: float = 0.05", "temperature: float = 0.1", "default temperature 0.1, not 0.05"),
    ("threshold: float | None = None", "threshold: float | None = 0.9",
     "default matching threshold 0.9 (MCITlib UCIT: none)"),
    ("return torch.softmax(similarities.float() / temperature, dim=-1)",
     "return torch.softmax(similarities.float() * temperature, dim=-1)",
     "SSA multiplies by the temperature"),
    ("return total.cpu() / len(samples)", "return total.cpu()",
     "the identity token is a sum, not a mean"),
    ("feats = self.encoder.text_features([s.question for s in samples[start : start + step]])",
     "feats = self.encoder.text_features([s.answer for s in samples[start : start + step]])",
     "identity tokens from the answers, not the instructions"),
    ("self.routing.weights = alpha.to(next(model.parameters()).device)",
     "self.routing.weights = alpha.flip(1).to(next(model.parameters()).device)",
     "the activations go to the wrong subspaces"),
    ("            lora = dataclasses.replace(lora, rank=self.options.rank)\n"
     "        model = add_lora(model, lora)",
     "            lora = dataclasses.replace(lora, rank=self.options.rank)\n"
     "        model = add_lora(model, dataclasses.replace(lora, rank=lora.rank + 1))",
     "subspaces one rank above the run's LoRA rank"),
)

SEFE = mutants(
    "methods/sefe/method.py",
    ("reg_weight: float = 2500.0", "reg_weight: float = 250.0", "default lambda 250, not 2.5e3"),
    ("key_fraction: float = 0.02", "key_fraction: float = 0.05", "default M = 5 %, not 2 %"),
    ("asd: bool = True", "asd: bool = False", "trains on the plain data by default"),
    ("top = torch.topk(update.detach().float().abs().flatten(), k).indices",
     "top = torch.topk(update.detach().float().flatten(), k).indices",
     "key elements by signed, not absolute, value"),
    ("return torch.unique(torch.cat([old.to(new.device), new])).to(torch.int32)", "return new",
     "each stage's keys replace the earlier ones"),
    ("terms.append(update.index_select(0, idx).abs().mean())",
     "terms.append(update.index_select(0, idx).abs().sum())",
     "the penalty sums, not averages, the key entries"),
    ("return weight * torch.stack(terms).mean()", "return torch.stack(terms).mean()",
     "the penalty ignores lambda"),
    ("self.regularised = []\n        return merge_lora(model)",
     "self.regularised = []\n        return model.unload()", "the stage's LoRA is dropped"),
)

MR_LORA = mutants(
    "methods/mr_lora/method.py",
    ("router_samples: int = 20", "router_samples: int = 4", "default router set of 4 per task"),
    ("router_lr: float = 5e-6", "router_lr: float = 5e-5", "default router lr 5e-5"),
    ("router_epochs: float = 40.0", "router_epochs: float = 4.0", "default router epochs 4"),
    ("router_max_new_tokens: int = 16", "router_max_new_tokens: int = 8",
     "default router answer of 8 tokens"),
    ("        set_projector_weights(plain, self.start_projector)\n        return plain",
     "        return plain", "the next expert starts from the last expert's projector"),
    ("self._select(model, chosen, prompts)", "self._select(model, chosen[::-1], prompts)",
     "samples run on another sample's chosen expert"),
    ("self._select(model, [router_index] * len(prompts), prompts)",
     "self._select(model, [0] * len(prompts), prompts)",
     "the routing question runs on the first expert, not the router"),
) + mutants(
    "methods/mr_lora/router.py",
    ("min(per_task, len(samples))", "min(per_task, len(samples)) // 2",
     "the router set holds half the samples asked for"),
)

TAILOR = mutants(
    "methods/model_tailor/method.py",
    ("sparsity: float = 0.9", "sparsity: float = 0.8", "default sparsity 0.8"),
    ("salience_weight: float = 0.8", "salience_weight: float = 0.5", "default salience 0.5"),
    ("calibration_samples: int = 128", "calibration_samples: int = 4",
     "default calibration on 4 conversations"),
    ("blocksize: int = 128", "blocksize: int = 32", "default blocks of 32 columns"),
    ("damp: float = 0.01", "damp: float = 0.1", "default damping 0.1"),
    ('compensation: str = "reference"', 'compensation: str = "obs"',
     "default compensation sign OBS's"),
    ("revert_projector: bool = True", "revert_projector: bool = False",
     "the projector keeps its fine-tuned value"),
    ("tuned = before + module.scaling[adapter] * (B.detach().float() @ A.detach().float())",
     "tuned = before + (B.detach().float() @ A.detach().float())", "the LoRA scaling is dropped"),
) + mutants(
    "methods/model_tailor/tailoring.py",
    ("salience = (W - W_pre).abs()", "salience = W.abs()",
     "salience is the weight's size, not its change"),
    ("sensitivity = W1**2 / torch.diag(U1).reshape(1, -1) ** 2",
     "sensitivity = W1**2 / torch.diag(U1).reshape(1, -1)", "sensitivity over [U]_jj, not squared"),
    ("return scores <= threshold", "return scores < threshold",
     "the threshold entry is kept"),
    ("return (salience_weight * standardised(salience)\n"
     "            + (1 - salience_weight) * standardised(sensitivity))",
     "return (salience_weight * standardised(sensitivity)\n"
     "            + (1 - salience_weight) * standardised(salience))",
     "the salience and sensitivity weights are swapped"),
    ("W[:, i2:] += sign * errors @ U[i1:i2, i2:]", "pass",
     "the error is not spread onto later blocks"),
)

SMOLORA = mutants(
    "methods/smolora.py",
    ("experts: int | None = 8", "experts: int | None = 4", "default 4 experts, not 8"),
    ("rank_per_expert = 16", "rank_per_expert = 8", "default rank 8 per expert, not 16"),
    ("alpha = torch.softmax(scores, dim=-1)", "alpha = torch.softmax(scores, dim=0)",
     "the fusion softmax runs across samples, not the two halves"),
    ("return alpha[..., :1] * vu + alpha[..., 1:] * follow",
     "return alpha[..., 1:] * vu + alpha[..., :1] * follow", "each half takes the other's weight"),
    ("follow = top1(instructions @ self.if_router.T)",
     "follow = top1(instructions[:1].expand_as(instructions) @ self.if_router.T)",
     "every sample takes the first sample's instruction expert"),
    ("vu = top1(pooled @ self.vu_router.T)", "vu = torch.softmax(pooled @ self.vu_router.T, -1)",
     "soft visual routes, not top-1"),
    ("self.scaling * h[..., half:, :].flatten(-2) @ self.B[:, cut:].T",
     "self.scaling * h[..., half:, :].flatten(-2) @ self.B[:, :cut].T",
     "the instruction experts use the visual experts' B"),
    ("features = self.encoder.text_features([question for question, _ in prompts])",
     "features = self.encoder.text_features([question[:1] for question, _ in prompts])",
     "the instruction embedding reads one character of the question"),
) + mutants(
    "cl_bench/models/moe_lora.py",
    ("return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)", "return x.mean(1)",
     "the sequence mean counts padding too"),
)

KEEPLORA = mutants(
    "methods/keeplora.py",
    ("weight_energy: float = 0.6", "weight_energy: float = 0.9", "default weight energy 0.9"),
    ("feature_energy: float = 0.99", "feature_energy: float = 0.9", "default feature energy 0.9"),
    ("alpha=options.alpha or rank / 4", "alpha=options.alpha or rank",
     "default alpha = rank, not rank / 4"),
    ("torch.linalg.svd(weight.float().T, full_matrices=False)",
     "torch.linalg.svd(weight.float(), full_matrices=False)",
     "the principal subspace of the output space"),
    ("k = max(int((share < energy).sum()), 1)", "k = int((share < energy).sum()) + 1",
     "one principal direction too many"),
    ("return gradient_t - subspace.T @ (subspace @ gradient_t)", "return gradient_t",
     "the gradient is not projected off the protected subspace"),
    ("need = energy - float(kept)", "need = energy",
     "the subspace's share of the gradient energy is ignored"),
    ("lora_a.requires_grad_(False)  # release --freeze_lora_A", "pass",
     "A trains instead of staying frozen"),
    ("sums[name].addmm_(grad.flatten(0, -2).float().T, x.flatten(0, -2).float())",
     "sums[name].addmm_(grad.flatten(0, -2).float().T.abs(), x.flatten(0, -2).float())",
     "the captured gradient drops the output gradient's sign"),
    ("self.subspaces[name] = grown_subspace(gradient, subspace,",
     "self.subspaces[name] = subspace.cpu() if True else grown_subspace(gradient, subspace,",
     "the subspace never grows after a task"),
)

SAME = mutants(
    "methods/same/layer.py",
    ("return max(1, min(int((share <= energy).sum()) + 1, s.numel()))",
     "return max(1, min(int((share <= energy).sum()), s.numel()))",
     "one principal direction too few"),
    ("scale = (scale / scale.max()).clamp(1.0 - ROUTER_SCALE, 1.0 + ROUTER_SCALE)",
     "scale = scale / scale.max()", "the router's scaling is not clamped"),
    ("return (along / (s[: uk.shape[1]] + mu)) @ uk.T + (grad - along @ uk.T) / mu",
     "return (along / (s[: uk.shape[1]] + mu)) @ uk.T + (grad - along @ uk.T)",
     "the expert gradient across the subspace is not scaled by 1 / mu"),
    ("frozen[own] = False", "pass", "the task's own expert can freeze"),
    ("probs = torch.softmax(logits / self.experts, dim=-1)",
     "probs = torch.softmax(logits, dim=-1)", "inference logits not divided by E"),
    ('mixed_b = torch.einsum("oer,be->bor", b, w)',
     'mixed_b = torch.einsum("oer,be->bor", b, torch.ones_like(w))',
     "the B factors are summed, not mixed by the routes"),
    ("if not self.training or self.task == 0 or not bool(self.prev_valid):",
     "if not self.training or not bool(self.prev_valid):",
     "the curvature hook runs on the first task"),
    ("self.utilization.mul_(EMA).add_((1 - EMA) * p.mean(0))",
     "self.utilization.mul_(1 - EMA).add_(EMA * p.mean(0))", "the utilization EMA weights swapped"),
    ("return masked / masked.sum(-1, keepdim=True)", "return masked",
     "masked routes are not renormalised"),
    ("kept = torch.zeros_like(p).scatter_(-1, top.indices, top.values)", "kept = p",
     "inference keeps every expert, not the top two"),
) + mutants(
    "methods/same/method.py",
    ("sims = torch.where(has_image.unsqueeze(1), both, text_sims)", "sims = both",
     "samples without an image use a zero image similarity"),
    ("prior[:, : sims.shape[1]] = torch.softmax(scale * sims, dim=-1)",
     "prior[:, : sims.shape[1]] = torch.softmax(sims, dim=-1)", "the prior ignores its scale"),
    ("prior_scale: float = 28.0", "prior_scale: float = 10.0", "default prior scale 10"),
    ("tau: float = 0.1", "tau: float = 0.5", "default tau 0.5"),
)

MODULES = (
    Module("metrics", ("tests/test_metrics.py",), METRICS),
    Module("consolidation", ("tests/test_consolidation.py", "tests/test_llava_c.py",
                             "tests/test_method_effects.py", "-k", "not sweep and not resume and "
                             "not stores and (consolidat or sac or lora_factors)"), CONSOLIDATION),
    Module("llava_c", ("tests/test_llava_c.py", "tests/test_method_effects.py", "-k",
                       "llava_c or uir or consolidat or forward_kl"), LLAVA_C),
    Module("hide_llava", ("tests/test_hide_llava.py", "tests/test_method_effects.py",
                          "tests/test_routed_lora.py", "-k",
                          "hide or rout or fus or assembl or layout or ablation"), HIDE),
    Module("baselines", ("tests/test_baselines.py",), BASELINES),
    Module("bounds", ("tests/test_method_effects.py", "tests/test_every_method.py", "-k",
                      "zeroshot or multitask or finetune"), BOUNDS),
    Module("scoring", ("tests/test_scoring.py",), SCORING),
    Module("generation", ("tests/test_generation.py",), GENERATION),
    Module("resume", ("tests/test_runner.py", "tests/test_llava_c.py", "tests/test_hide_llava.py",
                      "tests/test_baseline_runs.py", "-k",
                      "resum or contract or bad_input or olora"), RESUME),
    Module("sweep", ("tests/test_llava_c.py", "-k", "sweep"), SWEEP),
    Module("alpha_regions", ("tests/test_alpha_regions.py",), ALPHA_REGIONS),
    Module("prompts", ("tests/test_method_effects_routed.py", "tests/test_l2p.py",
                       "tests/test_modalprompt.py", "-m", "not slow", "-k",
                       "l2p or modalprompt"), PROMPTS),
    Module("moelora", ("tests/test_method_effects_routed.py", "tests/test_moelora.py", "-m",
                       "not slow", "-k", "moelora"), MOELORA),
    Module("disco", ("tests/test_method_effects_routed.py", "tests/test_disco.py", "-m",
                     "not slow", "-k", "disco"), DISCO),
    Module("sefe", ("tests/test_method_effects_routed.py", "tests/test_sefe.py", "-m", "not slow",
                    "-k", "sefe"), SEFE),
    Module("mr_lora", ("tests/test_method_effects_routed.py", "tests/test_mr_lora.py", "-m",
                       "not slow", "-k", "mr_lora"), MR_LORA),
    Module("smolora", ("tests/test_smolora.py",), SMOLORA),
    Module("keeplora", ("tests/test_keeplora.py",), KEEPLORA),
    Module("same", ("tests/test_same.py",), SAME),
    Module("model_tailor", ("tests/test_method_effects_routed.py", "tests/test_model_tailor.py",
                            "-m", "not slow", "-k", "model_tailor"), TAILOR),
)


@dataclass
class Result:
    module: str
    path: str
    bug: str
    killed: bool
    seconds: float
    note: str = ""


def scratch_copy() -> Path:
    """The working tree's files (tracked and untracked, not ignored) in a temporary folder."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
        capture_output=True,
    ).stdout.decode().split("\0")
    scratch = Path(tempfile.mkdtemp(prefix="clbench-mutation-"))
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            target = scratch / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return scratch


def run_tests(scratch: Path, tests: tuple[str, ...], timeout: int) -> tuple[int, float]:
    """pytest's exit code (124 on timeout) and the seconds it took, run in ``scratch``."""
    env = {**os.environ, "CLBENCH_CACHE": str(scratch / ".cache"), "PYTHONDONTWRITEBYTECODE": "1"}
    started = time.time()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
            cwd=scratch, env=env, capture_output=True, timeout=timeout,
        )
        code = done.returncode
    except subprocess.TimeoutExpired:
        code = 124
    return code, time.time() - started


def stale(root: Path, mutant: Mutant) -> str:
    """Why ``mutant`` no longer fits the code under ``root`` ("" when it does): its text must
    occur exactly once and the mutated file must parse."""
    file = root / mutant.path
    if not file.is_file():
        return f"{mutant.path} does not exist"
    original = file.read_text()
    count = original.count(mutant.find)
    if count != 1:
        return f"{mutant.find!r} occurs {count} times in {mutant.path}, not once"
    if file.suffix == ".py":
        try:
            ast.parse(original.replace(mutant.find, mutant.replace), filename=mutant.path)
        except SyntaxError as err:
            return f"the mutated {mutant.path} does not parse ({err.msg}, line {err.lineno})"
    return ""


def run_module(scratch: Path, module: Module, timeout: int) -> list[Result]:
    code, seconds = run_tests(scratch, module.tests, timeout)
    tests = " ".join(module.tests)
    print(f"\n{module.name}: pytest {tests} ({seconds:.0f} s unmutated)", flush=True)
    if code != 0:
        print(f"  SKIPPED: the tests fail without any bug planted (exit {code})", flush=True)
        return []
    results = []
    for mutant in module.mutants:
        why = stale(scratch, mutant)
        if why:
            results.append(Result(module.name, mutant.path, mutant.bug, False, 0.0, "STALE"))
            print(f"  STALE    {mutant.path}: {mutant.bug}: {why}", flush=True)
            continue
        file = scratch / mutant.path
        original = file.read_text()
        file.write_text(original.replace(mutant.find, mutant.replace))
        try:
            code, seconds = run_tests(scratch, module.tests, timeout)
        finally:
            file.write_text(original)
        note = "timeout" if code == 124 else ""
        results.append(Result(module.name, mutant.path, mutant.bug, code != 0, seconds, note))
        status = "killed " if code != 0 else "SURVIVED"
        took = f"{seconds:.0f} s" + (f", {note}" if note else "")
        print(f"  {status} {mutant.path}: {mutant.bug} ({took})", flush=True)
    return results


def report(results: list[Result]) -> str:
    """Kill rates per module over the mutants that fit the code; survivors and stale ones."""
    def rate(name: str, rows: list[Result]) -> str:
        killed = sum(r.killed for r in rows)
        share = f"{100 * killed / len(rows):7.1f} %" if rows else "      -"
        return f"{name:<15} {killed:>6} {len(rows):>6}  {share}"

    planted = [r for r in results if r.note != "STALE"]
    lines = ["", "module          killed  total  kill rate"]
    for module in MODULES:
        mine = [r for r in planted if r.module == module.name]
        if mine:
            lines.append(rate(module.name, mine))
    if planted:
        lines.append(rate("all", planted))
    survivors = [r for r in planted if not r.killed]
    if survivors:
        lines += ["", "survivors:"] + [f"  {r.module}: {r.path}: {r.bug}" for r in survivors]
    lost = [r for r in results if r.note == "STALE"]
    if lost:
        lines += ["", "STALE (no longer fit the code: fix these mutants):"]
        lines += [f"  {r.module}: {r.path}: {r.bug}" for r in lost]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", action="append", choices=[m.name for m in MODULES],
                        help="only these modules (repeatable; default all)")
    parser.add_argument("--list", action="store_true",
                        help="print the planted bugs (and the stale ones) and stop")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per test run")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args()
    chosen = [m for m in MODULES if not args.module or m.name in args.module]
    if args.list:
        n_stale = 0
        for module in chosen:
            print(f"{module.name} ({len(module.mutants)} bugs): pytest {' '.join(module.tests)}")
            for mutant in module.mutants:
                why = stale(ROOT, mutant)
                n_stale += bool(why)
                print(f"  {mutant.path}: {mutant.bug}" + (f"\n    STALE: {why}" if why else ""))
        if n_stale:
            raise SystemExit(f"{n_stale} mutants no longer fit the code (STALE above)")
        return
    scratch = scratch_copy()
    results: list[Result] = []
    try:
        for module in chosen:
            results += run_module(scratch, module, args.timeout)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        print(report(results))
        if args.json:
            args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    if any(r.note == "STALE" for r in results):
        raise SystemExit("some mutants no longer fit the code (STALE above)")


if __name__ == "__main__":
    main()
