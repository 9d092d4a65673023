"""A vision-language model on the engine against transformers: logits and greedy tokens with images in
the prompt (several sizes and aspect ratios, one and two images, prefill chunks that cut an image in
two, batched with text-only requests), and the prefix cache keyed by image."""

from __future__ import annotations

import io

import pytest
import torch
import transformers
from PIL import Image

from inferd.engine.config import EngineConfig
from inferd.engine.image_processor import ImageProcessor
from inferd.engine.offline.llm_engine import LLMEngine
from inferd.engine.sampling_params import InvalidParameterError, SamplingParams
from tests.tiny_vlm import png, reference_processor

QUESTION = "User:{images}What is in it?<end_of_utterance>\nAssistant:"
CASES = {  # name: image sizes (height, width)
    "wide": [(20, 33)],
    "tall": [(33, 20)],
    "small-square": [(10, 10)],
    "strip": [(7, 100)],
    "two-images": [(20, 33), (16, 16)],
}


@pytest.fixture(scope="module")
def ref_model(tiny_vlm):
    return transformers.Idefics3ForConditionalGeneration.from_pretrained(tiny_vlm, dtype=torch.float32).eval()


def _engine(path, **options) -> LLMEngine:
    # 24 tokens a step with 4-token blocks: prefills come in chunks that end inside images
    options = {"dtype": "float32", "block_size": 4, "max_num_batched_tokens": 24, "progress": False, **options}
    return LLMEngine(EngineConfig(model=str(path), **options))


def _prompt(engine: LLMEngine, sizes, seed=0):
    processor = ImageProcessor(engine.core.vision_spec)
    files = [png(*s, seed=seed + i) for i, s in enumerate(sizes)]
    images = [processor.process(f) for f in files]
    text = processor.expand(QUESTION.format(images="<image>" * len(images)), images)
    return files, text, engine.tokenizer.encode(text, add_special_tokens=False), [i.message() for i in images]


def _run(engine: LLMEngine, requests) -> dict:
    for rid, ids, params, images in requests:
        engine.add_request(rid, ids, params, images=images)
    done = {}
    while engine.has_unfinished:
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def _reference_inputs(path, files, text):
    processor = reference_processor(path)
    images = [[Image.open(io.BytesIO(f)) for f in files]]
    return processor(images=images, text=[QUESTION.format(images="<image>" * len(files))], return_tensors="pt")


def test_greedy_tokens_and_logprobs_match_transformers_batched_with_text(tiny_vlm, ref_model):
    engine = _engine(tiny_vlm)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    requests, expected = [], {}
    for seed, (name, sizes) in enumerate(CASES.items()):
        files, text, ids, images = _prompt(engine, sizes, seed=10 * seed)
        inputs = _reference_inputs(tiny_vlm, files, text)
        assert ids == inputs["input_ids"][0].tolist(), name
        with torch.no_grad():
            out = ref_model.generate(**inputs, max_new_tokens=12, do_sample=False, output_logits=True,
                                     return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
        expected[name] = (out.sequences[0, len(ids):].tolist(), torch.log_softmax(torch.cat(out.logits), -1))
        requests.append((name, ids, greedy, images))
    text_ids = engine.tokenizer.encode("The quick brown fox jumps over", add_special_tokens=False)
    requests.append(("text", text_ids, greedy, []))
    done = _run(engine, requests)
    for name, (tokens, logprobs) in expected.items():
        o = done[name].outputs[0]
        assert o.token_ids == tokens, name
        for i, (tok, lp) in enumerate(zip(o.token_ids, o.logprobs)):
            assert lp[tok].logprob == pytest.approx(logprobs[i, tok].item(), abs=2e-4), (name, i)
    with torch.no_grad():
        text_ref = ref_model.generate(torch.tensor([text_ids]), attention_mask=torch.ones(1, len(text_ids), dtype=torch.long),
                                      max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert done["text"].outputs[0].token_ids == text_ref[0, len(text_ids):].tolist()


def test_prompt_logits_match_transformers_at_every_position(tiny_vlm, ref_model):
    engine = _engine(tiny_vlm)
    files, text, ids, images = _prompt(engine, CASES["two-images"], seed=5)
    done = _run(engine, [("r", ids, SamplingParams(max_tokens=0, prompt_logprobs=1), images)])
    inputs = _reference_inputs(tiny_vlm, files, text)
    with torch.no_grad():
        lp = torch.log_softmax(ref_model(**inputs).logits[0], -1)
    got = torch.tensor([done["r"].prompt_logprobs[p][ids[p]].logprob for p in range(1, len(ids))])
    want = torch.stack([lp[p - 1, ids[p]] for p in range(1, len(ids))])
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)


def test_prefix_cache_hits_on_the_same_image_and_misses_on_another_of_the_same_size(tiny_vlm):
    engine = _engine(tiny_vlm)
    kv = engine.core.kv
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    _, _, ids_a, images_a = _prompt(engine, [(20, 33)], seed=1)
    _, _, ids_b, images_b = _prompt(engine, [(20, 33)], seed=2)
    assert ids_a == ids_b and images_a[0].hash != images_b[0].hash  # same tokens, other pixels
    first = _run(engine, [("a", ids_a, greedy, images_a)])["a"]
    assert first.num_cached_tokens == 0
    again = _run(engine, [("a2", ids_a, greedy, images_a)])["a2"]
    assert again.num_cached_tokens >= len(ids_a) - 4  # every full block but the last token's
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert engine.core.vision.num_cache_hits == 1 and engine.core.vision.num_encoded == 1
    other = _run(engine, [("b", ids_b, greedy, images_b)])["b"]
    first_image_token = ids_b.index(engine.core.vision_spec.image_token_id)
    assert other.num_cached_tokens == first_image_token // 4 * 4  # only the text before the image
    assert kv.prefix_hits > 0


def test_image_tokens_must_match_the_images(tiny_vlm, tiny_llama):
    engine = _engine(tiny_vlm)
    _, _, ids, images = _prompt(engine, [(20, 33)])
    with pytest.raises(InvalidParameterError, match="image tokens"):
        engine.add_request("x", ids, SamplingParams(max_tokens=1))
    with pytest.raises(InvalidParameterError, match="image tokens"):
        engine.add_request("y", ids[:-30] + ids[-5:], SamplingParams(max_tokens=1), images=images)
    assert not engine.has_unfinished
    text_engine = LLMEngine(EngineConfig(model=str(tiny_llama), dtype="float32", progress=False))
    with pytest.raises(InvalidParameterError, match="does not take images"):
        text_engine.add_request("z", [5, 6, 7], SamplingParams(max_tokens=1), images=images)
