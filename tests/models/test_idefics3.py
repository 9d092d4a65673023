"""Idefics3 (SmolVLM) image preprocessing and vision encoder against transformers, on the tiny checkpoint."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from inferd.engine.image_processor import ImageProcessor
from inferd.engine.tokenizer import Tokenizer
from inferd.models.loader import build_vision_encoder, load_checkpoint
from tests.tiny_vlm import png, reference_processor

SIZES = [(10, 10), (16, 16), (20, 33), (33, 20), (48, 48), (7, 100), (300, 200), (17, 16), (1, 1)]


@pytest.fixture(scope="module")
def ckpt(tiny_vlm):
    return load_checkpoint(tiny_vlm, progress=False)


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("size", SIZES)
def test_tiles_and_prompt_tokens_match_the_reference_processor(tiny_vlm, ckpt, size, split):
    ref = reference_processor(tiny_vlm)
    data = png(*size, seed=sum(size))
    text = "User:<image>What is in it?<end_of_utterance>\nAssistant:"
    expected = ref(images=[[Image.open(io.BytesIO(data))]], text=[text], do_image_splitting=split,
                   return_tensors="np")
    ours = ImageProcessor(ckpt.vision)
    image = ours.process(data, "image/png", split=split)
    np.testing.assert_array_equal(image.pixels, expected["pixel_values"][0])
    ids = Tokenizer(ckpt.tokenizer).encode(ours.expand(text, [image]), add_special_tokens=False)
    assert ids == expected["input_ids"][0].tolist()
    assert ids.count(ckpt.vision.image_token_id) == image.num_tokens


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_transparency_and_grey_images_convert_as_the_reference_does(tiny_vlm, ckpt, mode):
    data = png(20, 30, seed=3, mode=mode)
    expected = reference_processor(tiny_vlm).image_processor(images=[Image.open(io.BytesIO(data))],
                                                             return_tensors="np")
    np.testing.assert_array_equal(ImageProcessor(ckpt.vision).process(data).pixels, expected["pixel_values"][0])


def test_vision_encoder_matches_transformers(tiny_vlm, ckpt):
    ref = transformers.Idefics3ForConditionalGeneration.from_pretrained(tiny_vlm, dtype=torch.float32)
    encoder = build_vision_encoder(ckpt, torch.float32, torch.device("cpu"))
    processor = reference_processor(tiny_vlm)
    for size in [(20, 33), (48, 16), (5, 5)]:
        inputs = processor.image_processor(images=[Image.open(io.BytesIO(png(*size)))], return_tensors="pt")
        with torch.no_grad():
            expected = ref.model.get_image_features(inputs["pixel_values"],
                                                    inputs["pixel_attention_mask"]).pooler_output[0]
            ours = encoder(inputs["pixel_values"][0])
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
