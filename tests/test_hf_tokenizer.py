"""Pretrained (Hugging Face) tokenizers: special tokens and the chat template from the folder's files, <image>
added when missing, conversations tokenized as transformers tokenizes the rendered template, loss only on the
answers; bad tokenizers refused in one line before anything is written.

The tokenizers are tiny BPEs trained here and saved with transformers' save_pretrained, each with a chat
template shaped like a real family's (Qwen2's ChatML: no bos, <|im_end|> ends a turn; Llama 3's: bos and
headers written by the template, <|eot_id|> ends a turn).
"""

import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from conftest import SMALL_MODEL, one_line
from mmfm.config import load_config
from mmfm.data.chat import ChatTemplate, encode_conversation
from mmfm.data.loader import IGNORE_INDEX
from mmfm.data.synth import all_caption_texts
from mmfm.data.synth_instruct import all_instruct_texts, build_instruct_dataset
from mmfm.data.tokenizer import TextTokenizer, TokenizerError, install_tokenizer
from mmfm.errors import ConfigError
from mmfm.train.trainer import Trainer

import transformers  # noqa: E402  (the dev extra installs it: a missing one fails, never skips)

CHATML = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
          "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
          "{%- endif %}{%- for message in messages %}{%- if message.role != 'system' %}{{- '<|im_start|>' + "
          "message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
LLAMA3 = ("{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")
FAMILIES = {
    # name: (special tokens, tokenizer kwargs, template, what closes an answer)
    "chatml": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
               dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"), CHATML, "<|im_end|>\n"),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"), LLAMA3, "<|eot_id|>"),
    # A base model's tokenizer: its eos is not what the template ends a turn with, so mmfm appends it.
    "chatml_base": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], dict(eos_token="<|endoftext|>"), CHATML,
                    "<|im_end|>\n<|endoftext|>"),
}
ANSWERS = ["on the left it is red.", "two."]
CONVERSATION = [{"from": "human", "value": "<image>\nwhat colour is the object on the left?"},
                {"from": "gpt", "value": ANSWERS[0]},
                {"from": "human", "value": "how many objects are there?"},
                {"from": "gpt", "value": ANSWERS[1]}]


def save_tokenizer(folder, family, template=None):
    specials, kwargs, family_template, _ = FAMILIES[family]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = all_caption_texts("describe the image.") + all_instruct_texts(ChatTemplate())
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, **kwargs,
                                              chat_template=family_template if template is None else template)
    hf.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=list(FAMILIES))
def installed(request, tmp_path_factory):
    """(family, data folder holding the installed tokenizer, the source folder)."""
    source = save_tokenizer(tmp_path_factory.mktemp("hf") / request.param, request.param)
    out = tmp_path_factory.mktemp("data")
    install_tokenizer(source, out)
    return request.param, out, source


def messages(turns):
    roles = {"human": "user", "gpt": "assistant"}
    return [{"role": roles[t["from"]], "content": t["value"]} for t in turns]


def test_special_tokens_come_from_the_folder_and_image_is_added(installed):
    family, out, source = installed
    before = Tokenizer.from_file(str(source / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    tok = TextTokenizer.load(out / "tokenizer.json")
    ours = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.pretrained and tok.chat_template == FAMILIES[family][2]
    assert tok.image_id == before == ours.convert_tokens_to_ids("<image>")  # appended after the vocabulary
    assert tok.vocab_size == before + 1
    assert tok.eos_id == ours.eos_token_id
    assert tok.bos_id == ours.bos_token_id  # None where the tokenizer has none (ChatML)
    assert tok.pad_id == (ours.pad_token_id if ours.pad_token_id is not None else ours.eos_token_id)


def test_conversation_tokens_equal_transformers_and_loss_is_on_answers(installed):
    family, out, _ = installed
    tok = TextTokenizer.load(out / "tokenizer.json")
    hf = transformers.AutoTokenizer.from_pretrained(out)
    sample = encode_conversation(CONVERSATION, [None], tok, ChatTemplate(), tokens_per_image=1, seq_len=512)
    closes = FAMILIES[family][3]
    text = hf.apply_chat_template(messages(CONVERSATION), tokenize=False)
    expected = hf(text, add_special_tokens=False).input_ids
    if closes.endswith("<|endoftext|>"):  # the base tokenizer's eos, appended by mmfm
        expected = expected + [tok.eos_id]
    assert sample.input_ids == expected
    # Loss: exactly each answer and what closes it; the targets are the next tokens.
    carried = [i + 1 for i, t in enumerate(sample.targets) if t != IGNORE_INDEX]
    assert [sample.targets[i - 1] for i in carried] == [sample.input_ids[i] for i in carried]
    spans, start = [], None
    for i in range(len(sample.input_ids) + 1):
        if i in carried and start is None:
            start = i
        if i not in carried and start is not None:
            spans.append(hf.decode(sample.input_ids[start:i]))
            start = None
    end = "<|im_end|>\n" if family != "llama3" else "<|eot_id|>"
    assert spans == [ANSWERS[0] + end, ANSWERS[1] + closes]
    # Generation is prompted exactly as transformers' add_generation_prompt
    prompt = hf.apply_chat_template(messages(CONVERSATION[:3]), tokenize=False, add_generation_prompt=True)
    assert sample.input_ids[:sample.prompt_len] == hf(prompt, add_special_tokens=False).input_ids


def test_images_expand_and_carry_no_loss(installed):
    _, out, _ = installed
    tok = TextTokenizer.load(out / "tokenizer.json")
    sample = encode_conversation(CONVERSATION, [None], tok, ChatTemplate(), tokens_per_image=5, seq_len=512)
    positions = [i for i, t in enumerate(sample.input_ids) if t == tok.image_id]
    assert len(positions) == 5 and positions == list(range(positions[0], positions[0] + 5))
    assert all(sample.targets[i - 1] == IGNORE_INDEX for i in positions)


def test_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    # Keeps only the last assistant answer (as templates that drop earlier reasoning do): not prefix-stable.
    rewriting = ("{%- for m in messages %}{%- if m.role == 'assistant' and not loop.last %}<|im_start|>assistant\n"
                 "<|im_end|>\n{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}{%- endfor %}"
                 "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")
    out = tmp_path / "data"
    out.mkdir()
    install_tokenizer(save_tokenizer(tmp_path / "hf", "chatml", rewriting), out)
    tok = TextTokenizer.load(out / "tokenizer.json")
    one_line(ValueError, lambda: encode_conversation(CONVERSATION, [None], tok, ChatTemplate(), 1, 512),
             "renders turns 1..2 differently once turn 3", "data.chat.template=markers")


def test_template_runs_in_the_sandbox(tmp_path):
    hostile = "{{ ''.__class__.__mro__[1].__subclasses__() }}{% for m in messages %}{{ m.content }}{% endfor %}"
    out = tmp_path / "data"
    out.mkdir()
    install_tokenizer(save_tokenizer(tmp_path / "hf", "chatml", hostile), out)
    tok = TextTokenizer.load(out / "tokenizer.json")
    one_line(ValueError, lambda: encode_conversation(CONVERSATION, [None], tok, ChatTemplate(), 1, 512),
             "SecurityError")


def test_custom_code_tokenizer_is_refused_before_copying(tmp_path):
    source = save_tokenizer(tmp_path / "hf", "chatml")
    config = json.loads((source / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    out = tmp_path / "data"
    out.mkdir()
    one_line(TokenizerError, lambda: install_tokenizer(source, out), "auto_map", "never runs code")
    assert list(out.iterdir()) == []


def test_folder_without_tokenizer_json_is_refused(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    one_line(TokenizerError, lambda: install_tokenizer(tmp_path / "hf", tmp_path), "holds no tokenizer.json")


@pytest.fixture(scope="module")
def instruct_data(tmp_path_factory):
    """SFT data built with a pretrained ChatML tokenizer, and the same without a chat template."""
    root = tmp_path_factory.mktemp("instruct")
    with_template = save_tokenizer(root / "hf", "chatml")
    without = save_tokenizer(root / "hf-base", "chatml", template="")
    (without / "chat_template.jinja").unlink(missing_ok=True)
    built = {}
    for name, source in (("chat", with_template), ("base", without)):
        build_instruct_dataset(root / name, "sft", tokenizer=source, train_size=64, val_size=16, image_size=32,
                               shard_size=64, progress=False)
        built[name] = root / name
    return built


def sft_config(data, *extra):
    image_id = json.loads((data / "manifest.json").read_text())["tokenizer"]["image_token_id"]
    return load_config([f"data.path={data}", *SMALL_MODEL, "model.language.vocab_size=512",
                        f"model.image_token_id={image_id}", "model.vision.image_size=32", "model.vision.patch_size=8",
                        "stage=sft", "data.seq_len=160", "model.language.max_seq_len=160", "data.batch_size=4", "train.max_steps=2",
                        "train.schedule.warmup_steps=1", "checkpoint.every=0", "eval.num_samples=0",
                        "train.val_every=0", "logger.wandb.enabled=false", "logger.progress_bar=false", *extra])


def test_sft_trains_on_data_built_with_a_pretrained_tokenizer(instruct_data, tmp_path):
    manifest = json.loads((instruct_data["chat"] / "manifest.json").read_text())
    assert manifest["tokenizer"]["added_tokens"] == ["<image>"]
    summary = Trainer(sft_config(instruct_data["chat"]), tmp_path / "run").fit()
    assert summary["step"] == 2
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):  # generate reads them
        assert (tmp_path / "run" / name).is_file(), name


def test_sft_without_a_chat_template_fails_in_one_line_and_writes_nothing(instruct_data, tmp_path):
    run_dir = tmp_path / "run"
    one_line(ConfigError, lambda: Trainer(sft_config(instruct_data["base"]), run_dir), "has none",
             "data.chat.template=markers")
    assert not run_dir.exists()
    # The role markers instead, when asked for
    assert Trainer(sft_config(instruct_data["base"], "data.chat.template=markers"), run_dir).fit()["step"] == 2


def test_mmfm_tokenizer_exports_with_its_markers_as_a_chat_template(tmp_path):
    """`mmfm export` writes mmfm's own tokenizer with a tokenizer_config.json and data.chat's markers as a Jinja
    template: transformers renders the text mmfm's markers make (quotes and braces in a marker stay text)."""
    from mmfm.config.schema import ChatConfig
    from mmfm.data.tokenizer import export_tokenizer, train_tokenizer

    run_dir, out = tmp_path / "run", tmp_path / "out"
    run_dir.mkdir()
    out.mkdir()
    train_tokenizer(all_caption_texts("describe the image."), 300).save(str(run_dir / "tokenizer.json"))
    chat = ChatConfig(user='user {{ "q" }}: ')
    export_tokenizer(run_dir, out, chat)
    hf = transformers.AutoTokenizer.from_pretrained(out)
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    turns = [{"role": "system", "content": "be brief."}, {"role": "user", "content": "<image>\nwhat is it?"}]
    text = hf.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert text == '<bos>system: be brief.\nuser {{ "q" }}: <image>\nwhat is it?\nassistant: '
