"""A tiny transformers causal LM with a ChatML chat template, for the prompt-generation stage's tests.

``LlamaForCausalLM`` (2 layers, width 16: about 2-3k parameters a layer) and a byte-level BPE
tokenizer trained in-process with the ``tokenizers`` library on the built-in text below, so any
string encodes (unknown text falls back to bytes) and nothing is downloaded. Saved as a fast
tokenizer (``tokenizer.json``) with ``chat_template``, so ``apply_chat_template`` and ``generate``
work exactly as with a hub model: load with ``AutoTokenizer`` / ``AutoModelForCausalLM``.
"""

from __future__ import annotations

from pathlib import Path

from ..fsio import atomic_write_json
from .common import publish_dir, seeded

PACKAGES = ("transformers", "tokenizers")
IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
VOCAB_SIZE = 384  # 256 bytes + 3 specials + ~125 merges: enough for common words to be one token
# ChatML, as Qwen's models use: each turn is <|im_start|>role\ncontent<|im_end|>\n.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MODEL = {
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 8,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
# Training text for the BPE merges: prompt-like captions and chat words. Content barely matters;
# it only decides which merges exist.
CORPUS = [
    "You are a helpful assistant that writes short image descriptions.",
    "Write a prompt for a photo. Answer with one line only.",
    "a photo of a red cube on top of a blue sphere",
    "two cats sitting on a wooden table next to a green cup",
    "a watercolor painting of a lighthouse at sunset, soft light",
    "three yellow flowers in a glass vase on the left of a book",
    "an astronaut riding a horse on the moon, high detail",
    "a small dog wearing a hat, studio lighting, 35mm",
    "the word 'hello' written in neon letters on a brick wall",
    "a bowl of fruit with apples, oranges and bananas",
    "user assistant system prompt image skill count color spatial text style",
]


def write_llm(path: str | Path, seed: int = 0, *, force: bool = False) -> Path:
    """Write the tiny chat LM folder at ``path`` (config, safetensors, tokenizer.json, chat template)."""
    return publish_dir(Path(path), "llm", seed, PACKAGES, lambda tmp: _build(tmp, seed), force=force)


def train_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """Train the byte-level BPE on ``CORPUS`` and wrap it for transformers (specials + chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[END_OF_TEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, whatever the corpus holds
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=IM_END, pad_token=END_OF_TEXT, unk_token=None, bos_token=None,
        additional_special_tokens=[IM_START], chat_template=CHAT_TEMPLATE, model_max_length=MODEL["max_position_embeddings"],
    )


def _build(out: Path, seed: int) -> None:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (END_OF_TEXT, IM_END)}
    config = LlamaConfig(
        **MODEL, vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=ids[IM_END], pad_token_id=ids[END_OF_TEXT]
    )
    with seeded(seed):
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=ids[IM_END], pad_token_id=ids[END_OF_TEXT], do_sample=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _write_portable_tokenizer_config(out)


def _write_portable_tokenizer_config(out: Path) -> None:
    """Replace the saved tokenizer config with one every transformers >= 4.50 reads.

    transformers 5 names its own class (``TokenizersBackend``) and keeps the template in
    ``chat_template.jinja``; 4.x needs ``PreTrainedTokenizerFast`` and reads ``chat_template`` from here.
    """
    (out / "chat_template.jinja").unlink(missing_ok=True)
    atomic_write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": END_OF_TEXT,
        "unk_token": None,
        "additional_special_tokens": [IM_START],
        "model_max_length": MODEL["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
    })
