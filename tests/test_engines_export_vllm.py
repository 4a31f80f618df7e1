"""An FSDP-trained export is served by the vLLM CPU engine: same config/safetensors layout, and greedy decoding
agrees with transformers token for token (float32)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from engines_harness import make_data, make_engine, run_steps

from rlhf_ray.fixtures.tiny import load_tiny_tokenizer

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM (CPU build) not installed")]

SERVE = textwrap.dedent("""
    import json, os, sys
    run = sys.argv[2]
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1",
                      VLLM_CACHE_ROOT=run + "/cache", VLLM_RPC_BASE_PATH=run + "/rpc", VLLM_LOGGING_LEVEL="WARNING",
                      VLLM_CPU_OMP_THREADS_BIND="nobind")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    prompts = json.loads(sys.argv[3])
    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=128, seed=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    print("TOKENS=" + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
""")


def test_vllm_serves_the_exported_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    engine = make_engine(tiny_model_dir, "fsdp", lora_rank=4)    # one process; LoRA merged on export
    run_steps(engine, make_data(), range(2))
    engine.save_hf(tmp_path / "hf", tokenizer=load_tiny_tokenizer())
    prompts = make_data(steps=1)[0, 0, :, :6].tolist()
    script = tmp_path / "serve.py"
    script.write_text(SERVE)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "hf"), str(tmp_path), json.dumps(prompts)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    served = json.loads(done.stdout.split("TOKENS=")[-1])

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = torch.tensor(prompts)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                  min_new_tokens=8)[:, ids.shape[1]:].tolist()
    assert served == expected
