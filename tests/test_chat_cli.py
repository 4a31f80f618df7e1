"""`rlhf-ray chat`: one question answered from a checkpoint through its chat template, history kept across turns."""

import io

import pytest

from rlhf_ray.cli import main as cli_main
from rlhf_ray.pipelines.chat import converse, prompt_ids


def test_one_shot_answer_is_the_models_greedy_continuation(tiny_model_dir, capsys):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert cli_main(["chat", "--model", str(tiny_model_dir), "--prompt", "What is 3 + 4?", "--system", "Be brief.",
                     "--temperature", "0", "--max_new_tokens", "5"]) == 0
    printed = capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = prompt_ids(tokenizer, [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "What is 3 + 4?"}])
    assert tokenizer.decode(ids).count("Be brief.") == 1          # the system message went through the template
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)[0, len(ids):]
    answer = tokenizer.decode(expected, skip_special_tokens=True)
    assert answer.strip() and printed == answer + "\n"


def test_history_is_kept_and_reset(tiny_model_dir):
    from transformers import AutoTokenizer

    class Recorder:
        def __init__(self):
            self.prompts = []

        def reply(self, ids, out):
            self.prompts.append(tokenizer.decode(ids))
            return f"answer {len(self.prompts)}"

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat = Recorder()
    converse(chat, tokenizer, ["first", "second", "/reset", "third", "/exit", "never"], "sys", io.StringIO())
    assert len(chat.prompts) == 3
    assert "first" in chat.prompts[1] and "answer 1" in chat.prompts[1] and "second" in chat.prompts[1]
    assert "first" not in chat.prompts[2] and "sys" in chat.prompts[2]


def test_a_directory_without_a_model_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        cli_main(["chat", "--model", str(tmp_path), "--prompt", "hi"])
    assert exited.value.code == 2 and "no config.json there" in capsys.readouterr().err


def test_vllm_backend_answers_the_same_greedy_question(tiny_model_dir, capsys):
    pytest.importorskip("vllm")
    args = ["chat", "--model", str(tiny_model_dir), "--prompt", "What is 3 + 4?", "--temperature", "0",
            "--max_new_tokens", "5"]
    assert cli_main(args) == 0
    with_transformers = capsys.readouterr().out
    assert cli_main([*args, "--backend", "vllm"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == with_transformers.rstrip("\n")   # vLLM logs to stdout too


@pytest.mark.parametrize("mode, layer", [("int8", "Linear8bitLt"), ("int4", "Linear4bit")])
def test_quantized_chat_answers_on_cpu(tiny_model_dir, mode, layer, capsys):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is installed by the colossalai extra (make install)")
    from rlhf_ray.pipelines.chat import TransformersChat, build_parser

    args = build_parser().parse_args(["--model", str(tiny_model_dir), "--quantize", mode, "--temperature", "0"])
    assert type(TransformersChat(str(tiny_model_dir), None, args).model.model.layers[0].mlp.down_proj).__name__ == layer
    assert cli_main(["chat", "--model", str(tiny_model_dir), "--prompt", "What is 3 + 4?", "--quantize", mode,
                     "--temperature", "0", "--max_new_tokens", "5"]) == 0
    assert capsys.readouterr().out.strip()


def test_quantize_is_refused_with_vllm(tiny_model_dir, capsys):
    with pytest.raises(SystemExit) as exited:
        cli_main(["chat", "--model", str(tiny_model_dir), "--prompt", "hi", "--quantize", "int4", "--backend", "vllm"])
    assert exited.value.code == 2 and "use --backend transformers" in capsys.readouterr().err
