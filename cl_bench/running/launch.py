"""How a run is launched: one process, DDP under torchrun, or DeepSpeed ZeRO through the Trainer;
which of these a method declares it supports; ``clbench run --nproc N`` relaunching itself.

DeepSpeed configs ship in ``deepspeed_configs/`` (``--deepspeed zero2`` or ``zero2_offload``),
or any JSON file (``--deepspeed PATH``); the Trainer fills their ``"auto"`` values from the run's
config. ZeRO-3 partitions the weights themselves, which every method's between-step work
(merging, deltas, SAC, saving, generation) would have to gather: a method runs under ZeRO-3 only
if it declares ``"zero3"`` in its ``launchers``, otherwise the run is refused before it starts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cl_bench.errors import CLBenchError
from cl_bench.running.distributed import world_size

CONFIGS = Path(__file__).with_name("deepspeed_configs")


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.json"))


def deepspeed_config(spec: str) -> Path:
    """The DeepSpeed config file named by ``train.deepspeed``: a shipped name or a path."""
    shipped = CONFIGS / f"{spec}.json"
    path = shipped if shipped.is_file() else Path(spec).expanduser()
    if not path.is_file():
        raise CLBenchError(f"train.deepspeed={spec!r}: neither a shipped config "
                           f"({', '.join(shipped_configs())}) nor a JSON file")
    return path


def zero_stage(path: Path) -> int:
    """The ZeRO stage of a DeepSpeed config file (0 without ``zero_optimization``)."""
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CLBenchError(f"{path}: not a readable DeepSpeed JSON config ({err})") from None
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise CLBenchError(f"{path}: zero_optimization.stage is {stage!r}, expected 0 to 3")
    return int(stage)


def launcher_of(deepspeed: str | None, processes: int | None = None) -> str:
    """The launcher a run uses: ``zero3``, ``zero2`` (DeepSpeed stages 0-2), ``ddp`` (several
    processes) or ``single``."""
    if deepspeed:
        return "zero3" if zero_stage(deepspeed_config(deepspeed)) == 3 else "zero2"
    return "ddp" if (processes or world_size()) > 1 else "single"


def check_launcher(method: str, declared: tuple[str, ...], used: str) -> None:
    """Refuse, before any work, a launcher the method does not declare."""
    if used in declared:
        return
    why = {
        "zero3": "ZeRO-3 partitions the weights, which its merging, deltas, saving or "
                 "generation between steps would have to gather",
        "zero2": "it is not verified under DeepSpeed ZeRO-2",
        "ddp": "its state or extra losses are not verified identical across processes",
    }.get(used)
    raise CLBenchError(f"method {method} does not support the {used} launcher"
                       + (f" ({why})" if why else "") + f"; it declares launchers: "
                       f"{', '.join(declared)} (see clbench list)")


def relaunch(argv: list[str], processes: int) -> int:
    """Run ``clbench`` with ``argv`` in ``processes`` processes under torchrun (this machine's
    GPUs, or gloo on the CPU); returns torchrun's exit status."""
    if processes < 1:
        raise CLBenchError(f"--nproc {processes}: expected at least 1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={processes}", "-m", "cl_bench", *argv]
    print("[clbench] " + " ".join(command), file=sys.stderr, flush=True)
    return subprocess.run(command).returncode
