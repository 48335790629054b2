"""qvl.build: key layouts, sharding, tied head, dtype, and the errors for bad checkpoints."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qvl.build import load_model, resolve_model_path
from qvl.models.qwen2_vl.weights import canonical_key


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _state(path):
    return load_file(str(path / "model.safetensors"))


def _params(model):
    return {k: v for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def reference(tiny_ckpt):
    model, _ = load_model(tiny_ckpt)
    return _params(model)


def _same(model, reference):
    got = _params(model)
    assert set(got) == set(reference)
    for k, v in reference.items():
        assert torch.equal(got[k], v), k


def test_hub_layout_loads_every_tensor(tiny_ckpt, reference):
    stored = _state(tiny_ckpt)
    assert any(k.startswith("visual.") for k in stored) and "lm_head.weight" in stored
    for k, v in stored.items():
        assert torch.equal(reference[k], v), k
    assert set(reference) == set(stored)


def test_452_layout_and_sharded(tiny_ckpt, reference, tmp_path):
    """`model.visual.*` / `model.language_model.*` keys, split over two shards with an index."""
    d = _copy(tiny_ckpt, tmp_path / "ck")
    stored = _state(d)
    (d / "model.safetensors").unlink()
    renamed = {}
    for k, v in stored.items():
        if k.startswith("visual."):
            k = "model." + k
        elif k.startswith("model."):
            k = "model.language_model." + k[len("model."):]
        renamed[k] = v
    keys = sorted(renamed)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: renamed[k] for k in ks}, str(d / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in ks})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model, _ = load_model(d)
    _same(model, reference)


def test_nested_config_layout(tiny_ckpt, reference, tmp_path):
    from transformers import Qwen2VLConfig

    d = _copy(tiny_ckpt, tmp_path / "ck")
    flat = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(Qwen2VLConfig(**flat).to_json_string())
    assert "text_config" in json.loads((d / "config.json").read_text())
    model, config = load_model(d)
    assert config.hidden_size == 64 and config.mrope_section == [2, 3, 3]
    _same(model, reference)


def test_tied_head(tiny_ckpt_tied, tiny_ckpt, tmp_path):
    assert "lm_head.weight" not in _state(tiny_ckpt_tied)
    model, config = load_model(tiny_ckpt_tied)
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    # untied config but the file lacks lm_head.weight: the head falls back to the embedding
    d = _copy(tiny_ckpt, tmp_path / "ck")
    stored = _state(d)
    del stored["lm_head.weight"]
    save_file(stored, str(d / "model.safetensors"))
    with pytest.warns(UserWarning, match=r"config.json has tie_word_embeddings=false but the weights have no "
                                         r"lm_head.weight; the head shares the embedding"):
        model, config = load_model(d)
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight


def test_dtype_and_no_grad(tiny_ckpt, reference):
    model, _ = load_model(tiny_ckpt, dtype=torch.bfloat16, progress=True)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training
    assert torch.equal(model.model.norm.weight, reference["model.norm.weight"].bfloat16())
    with pytest.warns(UserWarning, match="float16 overflows"):
        load_model(tiny_ckpt, dtype=torch.float16)


def _edit(tiny_ckpt, tmp_path, fn):
    d = _copy(tiny_ckpt, tmp_path / "ck")
    stored = _state(d)
    fn(stored)
    save_file(stored, str(d / "model.safetensors"))
    return d


def test_unexpected_missing_and_misshaped_keys(tiny_ckpt, tmp_path):
    d = _edit(tiny_ckpt, tmp_path / "a", lambda s: s.update({"visual.extra.weight": torch.zeros(1),
                                                            "foo.bar": torch.zeros(1)}))
    with pytest.raises(ValueError, match=r"unexpected keys for Qwen2-VL: foo.bar, visual.extra.weight"):
        load_model(d)
    d = _edit(tiny_ckpt, tmp_path / "b", lambda s: (s.pop("model.norm.weight"), s.pop("visual.merger.ln_q.bias")))
    with pytest.raises(ValueError, match=r"missing keys: model.norm.weight, visual.merger.ln_q.bias"):
        load_model(d)
    d = _edit(tiny_ckpt, tmp_path / "c", lambda s: s.update({"model.norm.weight": torch.ones(65)}))
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \(65,\), expected \(64,\)"):
        load_model(d)


def test_not_a_qwen2vl_directory(tiny_ckpt, tmp_path):
    with pytest.raises(ValueError, match="has no config.json"):
        load_model(tmp_path)
    d = _copy(tiny_ckpt, tmp_path / "llava")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, model_type="llava")))
    with pytest.raises(ValueError, match="model_type='llava' is not supported"):
        load_model(d)
    d = _copy(tiny_ckpt, tmp_path / "bin")
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no safetensors weights .*pytorch_model.bin"):
        load_model(d)


def test_resolve_model_path(tiny_ckpt, tmp_path, monkeypatch):
    assert resolve_model_path(str(tiny_ckpt)) == tiny_ckpt
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="is a file"):
        resolve_model_path(str(tiny_ckpt / "config.json"))

    import huggingface_hub

    def offline(repo_id, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co' (offline mode)")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError,
                       match=r"could not download Qwen/Qwen2-VL-2B-Instruct .*offline mode.*pass a local directory"):
        resolve_model_path("Qwen/Qwen2-VL-2B-Instruct")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kw: str(tiny_ckpt))
    model, config = load_model("someone/tiny-qwen2-vl")
    assert config.vocab_size == 448


def test_canonical_key():
    assert canonical_key("model.language_model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"
    assert canonical_key("model.visual.blocks.0.attn.qkv.bias") == "visual.blocks.0.attn.qkv.bias"
    assert canonical_key("visual.merger.mlp.0.weight") == "visual.merger.mlp.0.weight"
    assert canonical_key("lm_head.weight") == "lm_head.weight"
