"""The BERT encoder against transformers' BertModel on tiny random checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from inferd.models.bert import BertConfig, build_bert
from tests.tiny_bert import build_tiny_bert


def _load(path):
    return json.loads((path / "config.json").read_text()), load_file(str(path / "model.safetensors"))


def _batch(vocab: int, lengths: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(5, vocab, (len(lengths), width), generator=g)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, 0), mask


@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
def test_hidden_states_match_transformers(tmp_path, act):
    path = build_tiny_bert(tmp_path / "bert", hidden_act=act)
    config, tensors = _load(path)
    ours = build_bert(config, tensors)
    ref = transformers.BertModel.from_pretrained(path, dtype=torch.float32).eval()
    ids, mask = _batch(config["vocab_size"], [17, 9, 1, 30])
    with torch.inference_mode():
        expected = ref(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        got = ours(ids, mask)
        torch.testing.assert_close(got[mask], expected[mask], atol=1e-5, rtol=1e-5)
        # no padding: the mask may be left out
        full = ref(input_ids=ids[:1, :17]).last_hidden_state
        torch.testing.assert_close(ours(ids[:1, :17]), full, atol=1e-5, rtol=1e-5)


def test_masked_lm_checkpoint_loads_without_its_head(tmp_path):
    path = build_tiny_bert(tmp_path / "mlm", masked_lm=True)
    config, tensors = _load(path)
    assert any(k.startswith("bert.") for k in tensors) and any(k.startswith("cls.") for k in tensors)
    ours = build_bert(config, tensors)
    ref = transformers.BertForMaskedLM.from_pretrained(path, dtype=torch.float32).eval()
    ids, mask = _batch(config["vocab_size"], [12, 5])
    with torch.inference_mode():
        expected = ref.bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        torch.testing.assert_close(ours(ids, mask)[mask], expected[mask], atol=1e-5, rtol=1e-5)


def test_missing_and_unexpected_weights_are_refused(tmp_path):
    config, tensors = _load(build_tiny_bert(tmp_path / "bert"))
    missing = {k: v for k, v in tensors.items() if "layer.1.attention.self.key" not in k}
    with pytest.raises(ValueError, match="missing weights"):
        build_bert(config, missing)
    with pytest.raises(ValueError, match="unexpected weight"):
        build_bert(config, {**tensors, "encoder.layer.0.attention.self.rotary.weight": torch.zeros(1)})


def test_unsupported_config_is_refused():
    base = dict(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    with pytest.raises(ValueError, match="hidden_act"):
        BertConfig.from_hf({**base, "hidden_act": "quick_gelu"})
    with pytest.raises(ValueError, match="position_embedding_type"):
        BertConfig.from_hf({**base, "position_embedding_type": "relative_key"})
