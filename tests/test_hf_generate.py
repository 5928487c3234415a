"""`mmfm generate --checkpoint <Hugging Face LLaVA folder>`: greedy answers token-identical to transformers'
`generate` on the same folder (weights, tokenizer with its chat template, image processor), and the folder
`mmfm export` writes carries all three.

The folder: a tiny random LLaVA (SigLIP tower, Qwen2 decoder) whose vocabulary is a tiny ChatML tokenizer's with
<image> added, saved by save_pretrained with a SigLIP image processor. transformers gets the prompt as its
LlavaProcessor builds it: the chat template applied to "<image>\\n{prompt}", the <image> token repeated once per
image feature (16). SigLIP's processor (mean = std = 0.5) makes bit-identical pixels in both.
"""


import pytest
import torch
from PIL import Image

from mmfm.cli.generate import parse_args, run
from mmfm.data.tokenizer import TextTokenizer, install_tokenizer
from test_hf_tokenizer import save_tokenizer

import transformers  # noqa: E402  (the dev extra installs it: a missing one fails, never skips)
NEW_TOKENS, FEATURES = 20, 16
PROMPT = "what colour is the object on the left?"


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    folder = root / "llava"
    folder.mkdir()
    install_tokenizer(save_tokenizer(root / "tok", "chatml"), folder)
    tok = TextTokenizer.load(folder / "tokenizer.json")
    vision = transformers.SiglipVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4)
    text = transformers.Qwen2Config(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=256, tie_word_embeddings=False)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.image_id,
                                      vision_feature_layer=-1, vision_feature_select_strategy="full",
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random everywhere, larger than init so that greedy answers vary with the image
        for name, p in model.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5 if "norm" in name else torch.randn(p.shape, generator=g) * 0.2)
    model.save_pretrained(folder)
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    images = []
    for i, colour in enumerate(["red", "blue"]):
        path = root / f"{colour}.png"
        Image.new("RGB", (40, 28), colour).save(path)
        images.append(path)
    return folder, model, images


def transformers_answer(folder, model, image) -> list[int]:
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    text = hf_tok.apply_chat_template([{"role": "user", "content": "<image>\n" + PROMPT}], tokenize=False,
                                      add_generation_prompt=True)
    text = text.replace("<image>", "<image>" * FEATURES)  # LlavaProcessor's expansion
    ids = hf_tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    processor = transformers.SiglipImageProcessor.from_pretrained(folder)
    pixels = processor(images=Image.open(image), return_tensors="pt").pixel_values
    out = model.generate(input_ids=ids, pixel_values=pixels, max_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_greedy_answers_equal_transformers(llava_folder):
    folder, model, images = llava_folder
    ours = run(parse_args(["--checkpoint", str(folder), "--images", *map(str, images), "--prompt", PROMPT,
                           "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu"]))
    theirs = [transformers_answer(folder, model, image) for image in images]
    print("mmfm:", [r["token_ids"] for r in ours], "transformers:", theirs)
    assert [r["token_ids"] for r in ours] == theirs
    assert all(len(t) == NEW_TOKENS for t in theirs)  # no early eos: all 20 tokens compared
    assert theirs[0] != theirs[1]  # the answer depends on the image


def test_language_only_folder_is_refused(tmp_path):
    from conftest import one_line
    from mmfm.checkpoint.hf import HFCheckpointError

    folder = tmp_path / "lm"
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                           num_hidden_layers=1, num_attention_heads=4,
                                                           num_key_value_heads=2)).save_pretrained(folder)
    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    one_line(HFCheckpointError, lambda: run(parse_args(["--checkpoint", str(folder), "--images", str(image)])),
             str(folder))
