"""Models a job cannot handle are refused on the driver before Ray starts: an architecture vLLM cannot generate with
(named with its config.json and the `--backend hf` fix) and a tokenizer without a chat template when conversations
must be rendered (named with the flag that gives one). The corpus in test_bad_input_corpus.py covers the template
cases through the CLI; the vLLM case needs vLLM installed."""

import importlib.util
import json
import shutil
import time

import pytest
from transformers import AutoTokenizer

from rlhf_ray.cli import main
from rlhf_ray.config.base import ConfigError
from rlhf_ray.fixtures.tiny import TOKENIZER_DIR
from rlhf_ray.pipelines.model_checks import check_chat_template, check_vllm_serves, vllm_generation_architectures

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")


def _with_architecture(model_dir, out, arch):
    shutil.copytree(model_dir, out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "architectures": [arch]}))
    return out


@needs_vllm
def test_vllm_registry_is_read_without_importing_vllm():
    import subprocess
    import sys

    archs = vllm_generation_architectures()
    assert {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM"} <= archs
    assert "BertModel" not in archs                     # an encoder: vLLM embeds with it, never generates
    # A fresh interpreter: other tests of this session may have imported vLLM already.
    probe = ("import sys; from rlhf_ray.pipelines.model_checks import vllm_generation_architectures as archs; "
             "assert archs(); print('vllm' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stdout + done.stderr


@needs_vllm
def test_an_architecture_vllm_cannot_serve_is_refused_with_the_file_and_the_fix(tiny_model_dir, tmp_path):
    check_vllm_serves(str(tiny_model_dir))              # LlamaForCausalLM: served
    alien = _with_architecture(tiny_model_dir, tmp_path / "alien", "AlienForCausalLM")
    with pytest.raises(ConfigError, match=r"--pretrain .*alien: vLLM cannot generate with architecture "
                                          r"'AlienForCausalLM' \(named in .*alien/config.json\).*--backend hf"):
        check_vllm_serves(str(alien))


@needs_vllm
def test_grpo_refuses_it_before_ray_starts(tiny_model_dir, tmp_path, capsys):
    alien = _with_architecture(tiny_model_dir, tmp_path / "alien", "AlienForCausalLM")
    from rl_data import prepare_prompts

    prompts = prepare_prompts(tiny_model_dir, tmp_path / "prompts")
    start = time.perf_counter()
    status = main(["grpo", "--pretrain", str(alien), "--prompt_dataset", str(prompts), "--reward_source",
                   "arithmetic", "--save_path", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert status == 2 and "AlienForCausalLM" in err and "--backend hf" in err and err.count("\n") == 1, err
    assert "resource plan" not in out and time.perf_counter() - start < 30      # refused before any planning


def test_a_tokenizer_without_a_chat_template_needs_one_given(tmp_path):
    shutil.copytree(TOKENIZER_DIR, tmp_path / "tok")
    for leftover in (tmp_path / "tok").glob("chat_template.*"):
        leftover.unlink()
    plain = AutoTokenizer.from_pretrained(tmp_path / "tok")
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert not plain.chat_template and "chat_template" not in config
    check_chat_template(plain, str(tmp_path / "tok"), "rlhf_ray/assets/templates/tiny.json")      # given: fine
    check_chat_template(AutoTokenizer.from_pretrained(TOKENIZER_DIR), str(TOKENIZER_DIR), None)  # its own: fine
    with pytest.raises(ConfigError, match=r"--tokenizer_dir .*tok: the tokenizer has no chat template and no "
                                          r"--conversation_template_config was given"):
        check_chat_template(plain, str(tmp_path / "tok"), None)
