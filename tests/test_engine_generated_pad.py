"""A model that *samples* an image/video pad id must not break the step (server load-test regression).

The generated pad id is an ordinary token: it is embedded from the table, like transformers does, and the
batch-mates of that request are unaffected.
"""
import numpy as np
from PIL import Image

from qvl.engine.llm_engine import LLMEngine
from qvl.llm import LLM
from qvl.sampling_params import SamplingParams


def test_generated_pad_token_is_an_ordinary_token(tiny_ckpt, monkeypatch):
    eng = LLMEngine.from_pretrained(str(tiny_ckpt), dtype="float32", device="cpu", max_model_len=512,
                                    kv_cache_memory=4 << 20)
    pad = eng.config.image_token_id
    model = eng.runner.model
    original = model.compute_logits

    def prefer_pad(hidden):
        logits = original(hidden)
        logits[:, pad] = logits.max() + 10.0          # every sampling row picks the image pad id
        return logits

    monkeypatch.setattr(model, "compute_logits", prefer_pad)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (56, 84, 3), dtype=np.uint8))
    prompt = {"prompt": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n"
                        "<|im_start|>assistant\n", "multi_modal_data": {"image": [img]}}
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    outs = LLM.from_engine(eng).generate([prompt, "plain text"], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == [[pad] * 4, [pad] * 4]
    assert all(o.outputs[0].finish_reason == "length" for o in outs)
    assert eng.stats()["kv_blocks_free"] == eng.stats()["kv_blocks_total"]
