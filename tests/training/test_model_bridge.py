"""The model section maps onto every dense family's HF config (as models/ reads it)."""
from pathlib import Path

import pytest

from training.config import load_config
from training.model_bridge import MODEL_TYPES, hf_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_family_files_accept_the_mapped_config(path):
    import models.hf as hf_mod  # imports MindSpore
    m = load_config(str(path)).model
    hf = hf_config(m)
    assert hf["model_type"] == MODEL_TYPES[m.family]
    cfg = hf_mod.family_of(hf).config_from_hf(hf)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups,
            cfg.ffn_hidden_size) == (m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads,
                                     m.ffn_hidden_size)
    assert cfg.rotary.base == m.rope_theta and cfg.norm_eps == m.norm_eps
    if m.family == "qwen3":
        assert cfg.attention.qk_norm
    if m.family == "glm4":
        assert cfg.rotary.fraction == 0.5
    if m.family == "llama3_1":
        assert cfg.rotary.scaling == "llama3"
