"""General benchmarks and probes in the runner: per stage in records.jsonl, gathered in
summary.json, shown in report.md (tiny LLaVA, two tasks, a few steps)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
from bench_files import write_bench, write_probes

from cl_bench.config import RunConfig
from cl_bench.evaluation.degradation import summary_general, summary_probes
from cl_bench.running import runner
from tasks.suites.ucit import UCIT_MICRO

HAS_LMMS = importlib.util.find_spec("lmms_eval") is not None


def test_summary_gathers_per_stage() -> None:
    records = [
        {"stage": 0, "general": {"b": {"acc": 50.0}},
         "probes": {"mean_words": 9.0, "examples": []}},
        {"stage": 1, "general": {"b": {"acc": 40.0, "f1": 1.0}}},
        {"stage": 2, "probes": {"mean_words": 2.0, "examples": [{"id": "x"}]}},
    ]
    assert summary_general(records) == {"b": {"acc": [50.0, 40.0, None], "f1": [None, 1.0, None]}}
    assert summary_probes(records) == [{"stage": 0, "mean_words": 9.0},
                                       {"stage": 2, "mean_words": 2.0}]
    assert summary_general([{"stage": 0}]) == {} and summary_probes([{"stage": 0}]) == []


def test_run_records_general_and_probes_per_stage(
    tiny_llava: Path, ucit_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    shutil.copytree(ucit_root, data)
    write_bench(data, [("Is it red? Answer yes or no.", "Yes"), ("Is it blue?", "No")],
                {"random": [("Is there a circle?", "yes")]}, [])
    write_probes(data / "general")
    suite = dataclasses.replace(UCIT_MICRO, name="tiny-micro", tasks=UCIT_MICRO.tasks[:2],
                                general_benchmarks=("micro_mme",), generator=None,
                                default_model=None)
    monkeypatch.setattr(runner, "get_suite", lambda name: suite)
    cfg = RunConfig(method="finetune", suite="tiny-micro", model=str(tiny_llava),
                    data_root=str(data), out=str(tmp_path / "run"))
    cfg.train.max_steps, cfg.train.batch_size, cfg.train.limit = 1, 4, 4
    cfg.eval.limit, cfg.eval.batch_size, cfg.eval.max_new_tokens = 2, 8, 3
    cfg.lora.rank = 2
    monkeypatch.setattr("cl_bench.evaluation.degradation.PROBE_TOKENS", 4)
    run_dir = runner.run(cfg)

    records = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    assert [("probes" in r) for r in records] == [True, True, True]
    assert all(r["probes"]["n"] == 2 for r in records)  # eval.limit: one text, one image
    assert records[0]["probes"]["language_shift"] == 0.0
    assert set(records[2]["probes"]["format_share"]) == {t.name for t in suite.tasks}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [p["stage"] for p in summary["probes"]] == [0, 1, 2]
    assert (run_dir / "probes" / "start.pt").exists()
    report = (run_dir / "report.md").read_text()
    assert "## Degradation probes" in report and "Tell me about the sky." in report
    if HAS_LMMS:
        assert all(set(r["general"]) == {"micro_mme"} for r in records)
        assert set(summary["general"]["micro_mme"]) == {"acc", "acc_plus"}
        assert len(summary["general"]["micro_mme"]["acc"]) == 3
        assert (run_dir / "general" / "stage_2" / "micro_mme.jsonl").exists()
        assert "## General benchmarks" in report
    else:
        assert "general" not in summary
