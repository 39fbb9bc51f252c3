"""The flagos plugin's per-process hook (FlagGems) and its attention backend choice."""

from __future__ import annotations

import fl_dispatch_flagos as flagos

from fl_dispatch.core.config import resolve_policy


def test_process_init_reports_why_flaggems_is_not_enabled_here():
    line = flagos.fl_dispatch_process_init(resolve_policy({}, detect=lambda: None))
    assert line.startswith("FlagGems unavailable: import flag_gems failed")


def test_process_init_respects_use_flaggems_off():
    policy = resolve_policy({"USE_FLAGGEMS": "0"}, detect=lambda: None)
    line = flagos.fl_dispatch_process_init(policy)
    assert line == ("FlagGems aten registration off (use_flaggems=False from "
                    "env:USE_FLAGGEMS)")


def test_process_init_records_enabled_ops_per_rank(tmp_path, monkeypatch):
    """With FlagGems importable, the blacklist reaches enable(unused=...) and each rank
    records its own list."""
    calls = {}

    class FakeGems:
        __version__ = "9.9"

        def enable(self, unused=()):
            calls["unused"] = list(unused)

        def only_enable(self, include=()):
            calls["include"] = list(include)

        def all_registered_ops(self):
            return ["add.Tensor", "silu"]

    from fl_dispatch_flagos import flaggems

    monkeypatch.setattr(flaggems, "flaggems_unavailable_reason", lambda: None)
    monkeypatch.setattr(flaggems, "_flag_gems", lambda: FakeGems())
    monkeypatch.setenv("RANK", "3")
    policy = resolve_policy({"FLAGGEMS_ENABLE_OPLIST_PATH": str(tmp_path / "ops.txt"),
                             "VLLM_FL_FLAGOS_BLACKLIST": "mm,to_copy"}, detect=lambda: None)
    line = flagos.fl_dispatch_process_init(policy)
    assert calls == {"unused": ["mm", "to_copy"]}
    assert (tmp_path / "ops.rank3.txt").read_text() == "add.Tensor\nsilu\n"
    assert "FlagGems 9.9: enable(unused=2 ops), 2 aten ops enabled" in line
    white = resolve_policy({"FLAGGEMS_ENABLE_OPLIST_PATH": str(tmp_path / "ops.txt"),
                            "VLLM_FL_FLAGOS_WHITELIST": "silu"}, detect=lambda: None)
    flagos.fl_dispatch_process_init(white)
    assert calls["include"] == ["silu"]


def test_attention_backend_names_a_vllm_triton_backend_or_ours_for_mla():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    import fl_dispatch

    assert flagos.attention_backend(False) == "TRITON_ATTN"
    assert AttentionBackendEnum["TRITON_ATTN"].name == "TRITON_ATTN"  # a member vLLM knows
    # MLA: fl-dispatch's own backend (TRITON_MLA with decode through flash_mla), by the name
    # the glue resolves to its slot (TRITON_MLA where it is not registered)
    assert flagos.attention_backend(True) == fl_dispatch.MLA_BACKEND


def test_attention_backend_needs_a_gpu_here():
    from fl_dispatch_flagos.capability import gpu_unavailable_reason

    assert gpu_unavailable_reason() is not None  # CI has no GPU: vLLM's own choice stays
