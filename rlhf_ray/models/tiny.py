"""Tiny Llama models with a bundled byte-level BPE tokenizer, for the demo, the tests and the benchmarks.

No model hub is reachable at run time, so every stage can start from a randomly initialised model written here in
plain HF format (config.json + safetensors + tokenizer files), which transformers, peft and vLLM all load.
head_dim is 64 in every flavour: vLLM's CPU attention refuses head_dim < 32.

    path = build_tiny_model("runs/tiny", flavour="debug")
    AutoModelForCausalLM.from_pretrained(path)
"""

from __future__ import annotations

from pathlib import Path

TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-tokenizer"

# flavour -> (hidden, layers, heads, intermediate). heads * 64 == hidden keeps head_dim at 64.
FLAVOURS: dict[str, tuple[int, int, int, int]] = {
    "debug": (128, 2, 2, 256),     # ~0.4M params: unit and integration tests
    "small": (256, 4, 4, 704),     # ~3M params: the demo
    "bench": (512, 4, 8, 1408),    # ~13M params: throughput benchmarks, where decoding must dominate
}

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def load_tiny_tokenizer():
    """The bundled tokenizer (byte-level BPE, 1,024 tokens, ChatML chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def build_tiny_config(flavour: str = "debug", vocab_size: int | None = None, max_position_embeddings: int = 1024):
    from transformers import LlamaConfig

    if flavour not in FLAVOURS:
        raise ValueError(f"unknown tiny flavour {flavour!r}; choose one of {sorted(FLAVOURS)}")
    hidden, layers, heads, inter = FLAVOURS[flavour]
    tokenizer = load_tiny_tokenizer()
    return LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden // heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )


def build_tiny_model(out_dir: str | Path, flavour: str = "debug", seed: int = 0, overwrite: bool = False) -> Path:
    """Write a randomly initialised tiny Llama plus the bundled tokenizer to out_dir (HF format); return out_dir."""
    import torch
    from transformers import LlamaForCausalLM

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists() and not overwrite:
        return out_dir
    torch.manual_seed(seed)
    model = LlamaForCausalLM(build_tiny_config(flavour))
    model.generation_config.eos_token_id = model.config.eos_token_id
    model.generation_config.pad_token_id = model.config.pad_token_id
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    load_tiny_tokenizer().save_pretrained(tmp)
    tmp.replace(out_dir) if not out_dir.exists() else _swap(tmp, out_dir)
    return out_dir


def _swap(tmp: Path, out_dir: Path) -> None:
    import shutil

    shutil.rmtree(out_dir)
    tmp.replace(out_dir)


def train_tiny_tokenizer(out_dir: str | Path = TOKENIZER_DIR, vocab_size: int = 1024) -> Path:
    """How the bundled tokenizer was made (run once; the result is committed under rlhf_ray/assets)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from rlhf_ray.data.synthetic import make_problems

    corpus = [f"{p.question} {p.answer}" for p in make_problems(4000, seed=123)]
    corpus += _ENGLISH_SEED.split("\n")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 1024
    fast.save_pretrained(str(out_dir))
    return Path(out_dir)


_ENGLISH_SEED = """Human: Can you help me with my homework?
Assistant: Of course. What is the question you are working on?
The quick brown fox jumps over the lazy dog.
Please answer the question with a short and helpful reply.
I am sorry, but I cannot help with that request because it could hurt someone.
Here is a summary of the main points in the article.
Let us think step by step about the problem and then give the final answer.
The answer is the sum of the two numbers.
You are a helpful, honest and harmless assistant.
What is the capital of France? The capital of France is Paris."""

if __name__ == "__main__":
    print(train_tiny_tokenizer())
