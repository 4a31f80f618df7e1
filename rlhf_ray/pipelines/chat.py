"""`rlhf-ray chat`: talk to a checkpoint (any HF model directory a job exported) through its own chat template.

    rlhf-ray chat --model runs/grpo --prompt "What is 3 + 4?"          one question, the answer streamed, then exit
    rlhf-ray chat --model runs/grpo --system "Answer with a number."   interactive; history kept; /reset, /exit

transformers serves it by default (tokens printed as they come), in full precision or `--quantize int8|int4`
(bitsandbytes, CPU or GPU); `--backend vllm` uses a vLLM engine (the answer is printed once complete: the offline
engine does not stream).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rlhf_ray.telemetry.quiet import drop_log_records


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-ray chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF model directory (with tokenizer and chat template)")
    parser.add_argument("--prompt", help="ask this one question and exit (default: interactive)")
    parser.add_argument("--system", help="system message put before the conversation")
    parser.add_argument("--backend", choices=("transformers", "vllm"), default="transformers")
    parser.add_argument("--max_new_tokens", type=int, default=256, help="answer length limit in tokens")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy")
    parser.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling mass")
    parser.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens; 0 = all")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--quantize", choices=("none", "int8", "int4"), default="none",
                        help="load the weights quantized with bitsandbytes (int8: LLM.int8(); int4: NF4), on CPU or "
                             "GPU; transformers backend only")
    return parser


def quantization_config(mode: str):
    """transformers' BitsAndBytesConfig for --quantize (None for none); ValueError when bitsandbytes is missing."""
    if mode == "none":
        return None
    # An optional faster 4-bit CPU kernel that would come from the Hub; bitsandbytes falls back to its own.
    drop_log_records({"bitsandbytes.backends.cpu.ops": r"^Failed to load CPU gemm_4bit_forward from kernels-community"})
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"--quantize {mode}: needs bitsandbytes ({exc}); pip install bitsandbytes, or drop "
                         f"--quantize") from None
    import torch
    import warnings
    from transformers import BitsAndBytesConfig

    # int8 matmuls run in fp16 by design; bitsandbytes says so on every layer of every call.
    warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast from")
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


class TransformersChat:
    """model.generate with a TextStreamer: each piece of the answer is printed as soon as it is decoded."""

    def __init__(self, model_dir: str, tokenizer, args) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.manual_seed(args.seed)
        quantized = quantization_config(args.quantize)
        device = {"device_map": "cuda" if torch.cuda.is_available() else "cpu"} if quantized else {}
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantized, **device).eval()
        self.tokenizer, self.args = tokenizer, args

    def reply(self, prompt_ids: list[int], out) -> str:
        import torch
        from transformers import TextStreamer

        class Printer(TextStreamer):
            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                out.write(text + ("\n" if stream_end else ""))
                out.flush()

        args = self.args
        sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k or None) \
            if args.temperature > 0 else dict(do_sample=False)
        with torch.no_grad():
            output = self.model.generate(torch.tensor([prompt_ids], device=self.model.device),
                                         max_new_tokens=args.max_new_tokens,
                                         streamer=Printer(self.tokenizer, skip_prompt=True, skip_special_tokens=True),
                                         pad_token_id=self.tokenizer.pad_token_id, **sampling)
        return self.tokenizer.decode(output[0, len(prompt_ids):], skip_special_tokens=True)


class VLLMChat:
    """One in-process vLLM engine (the rollout backend); the answer is printed when it is complete."""

    def __init__(self, model_dir: str, tokenizer, args) -> None:
        from rlhf_ray.rollout.backends import build_backend
        from rlhf_ray.rollout.config import GeneratorSection

        self.section = GeneratorSection(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                        max_new_tokens=args.max_new_tokens, seed=args.seed, kv_cache_gib=0.5)
        self.backend = build_backend("vllm", self.section, model_dir, model_dir, args.seed)
        self.turn = 0

    def reply(self, prompt_ids: list[int], out) -> str:
        from rlhf_ray.rollout.types import PromptChunk

        chunk = PromptChunk([0], [prompt_ids], [False], self.section.sampling(), seed_offset=self.turn)
        self.turn += 1
        text = self.backend.generate(chunk)[0][0].text
        out.write(text + "\n")
        out.flush()
        return text


def load_tokenizer(model_dir: str):
    """The checkpoint's tokenizer; ValueError naming the flag when the directory has none or no chat template."""
    from transformers import AutoTokenizer

    if not (Path(model_dir) / "config.json").is_file():
        raise ValueError(f"--model {model_dir}: no config.json there; give an HF model directory a job exported "
                         f"(its --save_path)")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.chat_template:
        raise ValueError(f"--model {model_dir}: its tokenizer has no chat template, so a conversation cannot be "
                         f"rendered; export it from a job that was given --conversation_template_config")
    return tokenizer


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The conversation so far rendered by the checkpoint's chat template, ending with the assistant's turn open."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def converse(chat, tokenizer, questions, system: str | None, out) -> None:
    """Answer each question in turn, keeping the history; `/reset` forgets it, `/exit` (or EOF) ends."""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    for question in questions:
        if question.strip() == "/exit":
            return
        if question.strip() == "/reset":
            messages = list(start)
            continue
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": chat.reply(prompt_ids(tokenizer, messages), out)})


def _typed_questions():
    while True:
        try:
            yield input("you> ")
        except EOFError:
            print()
            return


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1:
        parser.error(f"--temperature {args.temperature} / --top_p {args.top_p} / --max_new_tokens "
                     f"{args.max_new_tokens}: need temperature >= 0, 0 < top_p <= 1, max_new_tokens >= 1")
    if args.quantize != "none" and args.backend == "vllm":
        parser.error(f"--quantize {args.quantize} with --backend vllm: not supported here (vLLM's CPU build has no "
                     f"bitsandbytes kernels); use --backend transformers")
    try:
        tokenizer = load_tokenizer(args.model)
        quantization_config(args.quantize)          # refuse a missing bitsandbytes before loading anything
    except ValueError as exc:
        parser.error(str(exc))
    chat = (VLLMChat if args.backend == "vllm" else TransformersChat)(args.model, tokenizer, args)
    if args.prompt is not None:
        converse(chat, tokenizer, [args.prompt], args.system, sys.stdout)
    else:
        print("chatting with " + args.model + "; /reset forgets the conversation, /exit (or Ctrl-D) ends", flush=True)
        converse(chat, tokenizer, _typed_questions(), args.system, sys.stdout)
    return 0
