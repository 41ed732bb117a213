"""A snapshot of earlier releases (one memory/ folder written by PatchMemory.save) is loaded once
and rewritten as segments at the next snapshot (seeded random tiny ViT; weights do not matter)."""

import json

from musc_stream.model.backbone import BackboneSpec, load_backbone
from musc_stream.service.config import settings_with
from musc_stream.stream.engine import Engine, state_dir_name

from .test_eviction import _frames


def test_a_single_folder_snapshot_is_loaded_and_rewritten_as_segments(tmp_path, caplog):
    backbone = load_backbone(BackboneSpec(name="random-vit-tiny", pretrained=None, image_size=64))
    settings = settings_with(engine={"window_size": 6, "min_references": 5, "drift_threshold": None,
                                     "drift_ratio": None},
                             memory={"patches_per_frame": 8}, threshold={"min_history": 5})
    engine = Engine(backbone, settings)
    for f in _frames("old", 8, seed=4):
        engine.process([f])
    state = engine.lines["old"]
    folder = tmp_path / state_dir_name("old")
    folder.mkdir()
    state.memory.save(folder / "memory")  # what save_state wrote before segments
    (folder / "threshold.json").write_text(json.dumps({"line": "old", "threshold": state.threshold.state_dict()}))
    caplog.set_level("INFO")
    fresh = Engine(backbone, settings)
    assert fresh.load_state(tmp_path) == ["old"]
    assert "single-folder format loaded" in caplog.text
    assert fresh.lines["old"].memory_size == state.memory_size > 0
    assert fresh.save_state(tmp_path) > 0
    assert not (folder / "memory").exists() and len(list(folder.glob("manifest-*.json"))) == 1
    again = Engine(backbone, settings)
    assert again.load_state(tmp_path) == ["old"] and again.lines["old"].memory_size == state.memory_size
