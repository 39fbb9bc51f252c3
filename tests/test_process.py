"""The selection line names the rank of the process that runs the model.

Regression: in vLLM 0.25's CUDA build with one GPU the model runs in the ``EngineCore``
process, which has neither ``RANK`` nor a ``VllmWorker-N`` name, so its line said ``rank=-``.
The rank now also comes from an initialized ``torch.distributed`` group, and a process whose
start-up line had no rank logs it again, once, when it builds the model."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import os, tempfile, torch.distributed as dist
from fl_dispatch.core.process import process_identity, process_rank
os.environ.pop("RANK", None)
print("before", process_rank())
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0,
                        world_size=1)
print("after", process_rank(), process_identity().split()[0])
"""


def test_rank_comes_from_torch_distributed_when_nothing_else_names_it() -> None:
    proc = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["before None", "after 0 rank=0"]


def test_a_rankless_process_logs_its_line_again_when_it_builds_the_model(
        monkeypatch, caplog) -> None:
    import logging

    from fl_dispatch.vllm_glue import plugin

    caplog.set_level(logging.INFO, logger="fl_dispatch")
    monkeypatch.setitem(plugin._state, "summary", "rms_norm->reference.torch | layers: none")
    monkeypatch.setitem(plugin._state, "ranked", False)
    monkeypatch.setattr(plugin, "process_rank", lambda: "0")
    monkeypatch.setattr(plugin, "process_identity", lambda: "rank=0 pid=1 process=EngineCore")
    plugin.announce_model_process()
    plugin.announce_model_process()  # once
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["fl-dispatch rank=0 pid=1 process=EngineCore (builds the model): "
                     "rms_norm->reference.torch | layers: none"]
