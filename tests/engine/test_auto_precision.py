"""``--dtype auto``: which measured candidate is served, and the cache that makes later starts skip measuring."""

from __future__ import annotations

import json
import shutil

import pytest

from qubrid_lab.engine.auto_precision import CACHE_FILE, fastest_passing


def figures(b1: float, b16: float, passes: bool = True, prefill: float = 300.0) -> dict:
    entry = {"passes": passes, "mean_kl": 0.001 if passes else 0.5, "clear_top1": 1.0 if passes else 0.8}
    if passes:
        entry["decode_ms"] = {"1": b1, "16": b16}
        entry["prefill_ms"] = prefill
    return entry


@pytest.mark.parametrize(
    ("candidates", "picked"),
    [
        ({"float32": figures(40, 120), "bfloat16": figures(30, 50)}, "bfloat16"),  # faster at both sizes
        ({"float32": figures(40, 120), "bfloat16": figures(38, 112)}, "float32"),  # ~6% faster: not worth it
        ({"float32": figures(32, 91), "bfloat16": figures(43, 51)}, "float32"),  # a trade-off, not a speed-up
        ({"float32": figures(60, 150), "w4a32": figures(35, 130, prefill=320)}, "w4a32"),  # prefill within noise
        ({"float32": figures(60, 150), "w4a16": figures(31, 143, prefill=650)}, "float32"),  # long prompts slower
        ({"float32": figures(40, 120), "int8": figures(10, 20, passes=False)}, "float32"),  # too inaccurate
        ({"float32": figures(40, 120), "bfloat16": figures(30, 60), "int8": figures(25, 50)}, "int8"),
        ({"bfloat16": figures(40, 50, passes=False), "float16": figures(45, 60)}, "float16"),  # default fails
        ({"bfloat16": figures(40, 50, passes=False)}, "bfloat16"),  # nothing passes: the default stays
    ],
)
def test_the_default_is_left_only_for_a_clearly_faster_accurate_path(candidates, picked):
    default = next(iter(candidates))
    assert fastest_passing(candidates, default) == picked


def test_auto_measures_every_candidate_then_reuses_the_cached_pick(engine_factory, tmp_path_factory):
    first = engine_factory("tiny-auto", dtype="auto")
    choice = first.precision_choice
    assert choice.how == "measured"
    assert set(choice.candidates) == {"float32", "bfloat16", "w8a16", "w4a16", "w4a32", "int8"}
    assert choice.candidates["float32"]["passes"] and choice.candidates["float32"]["mean_kl"] < 1e-4
    assert choice.precision.label == fastest_passing(choice.candidates, "float32")
    assert first.precision == choice.precision
    assert first.model.dtype == choice.precision.dtype

    second = engine_factory("tiny-auto-again", dtype="auto")
    assert second.precision_choice.how == "cached"
    assert second.precision_choice.candidates == choice.candidates
    assert second.precision == choice.precision


def test_a_changed_model_is_measured_again(engine_factory, tiny_model_dir, tmp_path):
    from qubrid_lab.engine.local import LocalChatEngine
    from qubrid_lab.models.catalogue import ModelEntry

    engine_factory("tiny-auto-key", dtype="auto")
    changed = tmp_path / "tiny-changed"
    shutil.copytree(tiny_model_dir, changed)
    config = json.loads((changed / "config.json").read_text())
    config["rms_norm_eps"] = config["rms_norm_eps"] * 10
    (changed / "config.json").write_text(json.dumps(config))
    engine = LocalChatEngine(
        ModelEntry("tiny-changed", "chat", f"dir:{changed}", owned_by="tests"),
        cache_dir=engine_factory.cache_dir,
        device="cpu",
        dtype="auto",
    )
    try:
        assert engine.precision_choice.how == "measured"
    finally:
        engine.close()
    entries = json.loads((engine_factory.cache_dir / CACHE_FILE).read_text()).values()
    assert len(entries) == 2
    machines = {json.dumps(entry["identity"]["machine"], sort_keys=True) for entry in entries}
    assert len(machines) == 1  # same machine, two models
