"""The bad-input corpus: mistakes a new user makes, each answered by one message that names the file, line, field
or flag and the fix, a non-zero exit status, no traceback, and no change to any file that was there before.

Every case runs `rlhf-ray <command>` in this process (no Ray: all of these are refused before it would start)
against one shared world of real inputs: a tiny model, prepared sft / prompt / preference data, a checkpoint
directory with broken checkpoints, and small files holding each data mistake. Add a case for every mistake that
gets a precise answer, so that it keeps getting one.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil

import pytest

from rlhf_ray.checkpoint.atomic import atomic_directory
from rlhf_ray.cli import main
from rlhf_ray.fixtures.demo_data import write_demo_data
from rlhf_ray.fixtures.tiny import TOKENIZER_DIR, build_tiny_model

TEMPLATE = "rlhf_ray/assets/templates/tiny.json"
TINY = ["--tokenizer_dir", str(TOKENIZER_DIR), "--conversation_template_config", TEMPLATE]
HUMAN, ASSISTANT = {"from": "human", "content": "q"}, {"from": "assistant", "content": "a"}
GOOD = {"messages": [HUMAN, ASSISTANT]}


def _jsonl(*rows) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


BAD_FILES = {
    "empty.jsonl": "",
    "blank.jsonl": "  \n\n\t \n",
    "only_questions.jsonl": _jsonl({"messages": [HUMAN]}, {"messages": [HUMAN]}),
    "bad_json.jsonl": _jsonl(GOOD) + '{"messages": [\n',
    "bad_array.json": '[\n  {"messages": []},\n  {oops}\n]\n',
    "unknown_role.jsonl": _jsonl(GOOD, {"messages": [HUMAN, {"from": "robot", "content": "a"}]}),
    "no_messages.jsonl": _jsonl({"messages": "hi"}),
    "not_objects.jsonl": "[1, 2]\n",
    "empty_content.jsonl": _jsonl({"messages": [{"from": "human", "content": ""}, ASSISTANT]}),
    "unknown_keys.jsonl": _jsonl({"text": "hello"}),
    "out_of_order.jsonl": _jsonl({"messages": [HUMAN, HUMAN, ASSISTANT]}),
    "gsm8k_no_answer.jsonl": _jsonl({"question": "q", "answer": "just words"}),
    "same_pair.jsonl": _jsonl({"context": [HUMAN], "chosen": [ASSISTANT], "rejected": [ASSISTANT]}),
    "chosen_asks.jsonl": _jsonl({"context": [HUMAN], "chosen": [ASSISTANT, HUMAN], "rejected": [ASSISTANT]}),
    "template_bad.json": "{not json",
    "template_type.json": json.dumps({"chat_template": 5}),
    "yaml_key.yaml": "train:\n  lrr: 0.1\n",
    "yaml_type.yaml": "train:\n  lr: fast\n",
    "yaml_syntax.yaml": "train: [\n",
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    build_tiny_model(root / "model", flavour="debug", seed=0)
    files = write_demo_data(root / "in", n=24)
    for kind in ("sft", "prompt", "preference"):
        assert main(["prepare", "--type", kind, "--input", str(files[kind]), "--output", str(root / kind), *TINY]) == 0
    for name, text in BAD_FILES.items():
        (root / "bad" / name).parent.mkdir(exist_ok=True)
        (root / "bad" / name).write_text(text)
    (root / "bad" / "bad_utf8.jsonl").write_bytes(_jsonl(GOOD, GOOD).encode() + b'{"messages": "\xff"}\n')
    whole = gzip.compress(_jsonl(*[GOOD] * 3000).encode())
    (root / "bad" / "cut.jsonl.gz").write_bytes(whole[:len(whole) // 2])
    shutil.copytree(root / "model", root / "plain")                 # a base model: its tokenizer has no chat template
    (root / "plain" / "chat_template.jinja").unlink()
    (root / "nodata").mkdir()
    (root / "nodata" / "readme.txt").write_text("not data")
    for step in (1, 2):
        with atomic_directory(root / "ckpts" / f"step_{step}") as tmp:
            (tmp / "engine_state.json").write_text(json.dumps({"step": step}))
    (root / "ckpts" / "step_2" / "engine_state.json").write_text(json.dumps({"step": 9}))      # bit rot
    (root / "ckpts" / "step_1" / "COMPLETE").unlink()                                          # never finished
    return root


def _snapshot(root) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


def prepare(kind: str, source: str, *extra: str, output: str = "{w}/new") -> list[str]:
    return ["prepare", "--type", kind, "--input", source, "--output", output, *extra]


SFT = ["sft", "--pretrain", "{w}/model", "--dataset", "{w}/sft", "--save_path", "{w}/run"]
GRPO = ["grpo", "--pretrain", "{w}/model", "--prompt_dataset", "{w}/prompt", "--save_path", "{w}/run",
        "--reward_source", "arithmetic"]

# (id, argv with {w} for the world directory, exit status, what the one message must say)
CASES = [
    # --- data files ---------------------------------------------------------------------------------------------
    ("empty-file", prepare("sft", "{w}/bad/empty.jsonl", *TINY), 1,
     r"--input holds no rows \(the files are empty or whitespace only\); nothing was written"),
    ("whitespace-file", prepare("sft", "{w}/bad/blank.jsonl", *TINY), 1, r"--input holds no rows"),
    ("every-row-dropped-reading", prepare("sft", "{w}/bad/only_questions.jsonl", *TINY), 1,
     r"all 2 input rows were dropped during reading \(no_assistant_turn: 2\); nothing was written"),
    ("every-row-dropped-tokenizing", prepare("sft", "{w}/in/sft.jsonl", "--max_length", "8", *TINY), 1,
     r"all 24 input rows were dropped during tokenization \(no_response_within_max_length: 24\).*--max_length"),
    ("truncated-gz", prepare("sft", "{w}/bad/cut.jsonl.gz", *TINY), 1,
     r"cut.jsonl.gz: line \d+: cannot read the file from here on .*truncated or corrupt .*gzip -t"),
    ("invalid-utf8-deep", prepare("sft", "{w}/bad/bad_utf8.jsonl", *TINY), 1,
     r"bad_utf8.jsonl: line 3: not valid UTF-8 \(byte 15 of the line is b'\\xff'\); save the file as UTF-8"),
    ("bad-json-line", prepare("sft", "{w}/bad/bad_json.jsonl", *TINY), 1, r"bad_json.jsonl: line 2: not valid JSON"),
    ("bad-json-array", prepare("sft", "{w}/bad/bad_array.json", *TINY), 1, r"bad_array.json: line 3: not valid JSON"),
    ("unknown-role", prepare("sft", "{w}/bad/unknown_role.jsonl", *TINY), 1,
     r"unknown_role.jsonl: line 2: field 'messages\[1\].from': unknown role 'robot'; expected human or assistant"),
    ("messages-not-a-list", prepare("sft", "{w}/bad/no_messages.jsonl", *TINY), 1,
     r"no_messages.jsonl: line 1: field 'messages': expected list, got str"),
    ("rows-not-objects", prepare("sft", "{w}/bad/not_objects.jsonl", *TINY), 1,
     r"not_objects.jsonl: item 1: expected a JSON object per row, got int"),
    ("empty-content", prepare("sft", "{w}/bad/empty_content.jsonl", *TINY), 1,
     r"empty_content.jsonl: line 1: field 'messages\[0\].content': empty content"),
    ("undetectable-format", prepare("sft", "{w}/bad/unknown_keys.jsonl", *TINY), 1,
     r"unknown_keys.jsonl: line 1: cannot tell the format from the keys \['text'\]"),
    ("turns-out-of-order", prepare("sft", "{w}/bad/out_of_order.jsonl", *TINY), 1,
     r"out_of_order.jsonl: line 1: messages\[1\] is human, expected assistant"),
    ("gsm8k-without-answer-line", prepare("prompt", "{w}/bad/gsm8k_no_answer.jsonl", "--format", "gsm8k", *TINY),
     1, r"gsm8k_no_answer.jsonl: line 1: field 'answer': does not end with '#### <number>'"),
    ("format-cannot-make-type", prepare("preference", "{w}/bad/gsm8k_no_answer.jsonl", "--format", "gsm8k", *TINY),
     1, r"--format gsm8k cannot make --type preference; it makes prompt, sft, ptx"),
    ("chosen-equals-rejected", prepare("preference", "{w}/bad/same_pair.jsonl", *TINY), 1,
     r"all 1 input rows were dropped during reading \(chosen_equals_rejected: 1\)"),
    ("chosen-ends-on-human-turn", prepare("preference", "{w}/bad/chosen_asks.jsonl", *TINY), 1,
     r"dropped during reading \(chosen_ends_on_human_turn: 1\)"),
    ("input-missing", prepare("sft", "{w}/nowhere.jsonl", *TINY), 1,
     r"--input .*nowhere.jsonl: no such file or directory"),
    ("input-dir-without-data", prepare("sft", "{w}/nodata", *TINY), 1,
     r"--input .*nodata: the directory holds no .json, .jsonl, .json.gz, .jsonl.gz files"),
    # --- outputs ------------------------------------------------------------------------------------------------
    ("output-exists", prepare("sft", "{w}/in/sft.jsonl", *TINY, output="{w}/sft"), 1,
     r"--output .*/sft already exists; pass --overwrite to replace it"),
    ("overwrite-the-input-dir", prepare("sft", "{w}/in/sft.jsonl", "--overwrite", *TINY, output="{w}/in"), 1,
     r"--output .*/in exists and is not the output of an earlier `rlhf-ray prepare`.*will not delete it"),
    ("overwrite-what-holds-the-input", prepare("sft", "{w}/sft/jsonl", "--overwrite", *TINY, output="{w}/sft"), 1,
     r"--output .*/sft is or contains --input .*/sft/jsonl; writing it would replace the input"),
    ("output-is-a-file", prepare("sft", "{w}/in/sft.jsonl", *TINY, output="{w}/in/sft.jsonl"), 1,
     r"--output .*sft.jsonl already exists"),
    # --- tokenizer and template configs -------------------------------------------------------------------------
    ("template-config-missing", prepare("sft", "{w}/in/sft.jsonl", "--tokenizer_dir", str(TOKENIZER_DIR),
                                        "--conversation_template_config", "{w}/nope.json"), 1,
     r"--conversation_template_config .*nope.json: file not found; start from one in rlhf_ray/assets/templates/"),
    ("template-config-not-json", prepare("sft", "{w}/in/sft.jsonl", "--tokenizer_dir", str(TOKENIZER_DIR),
                                         "--conversation_template_config", "{w}/bad/template_bad.json"), 1,
     r"template_bad.json: line 1: not valid JSON"),
    ("template-config-wrong-type", prepare("sft", "{w}/in/sft.jsonl", "--tokenizer_dir", str(TOKENIZER_DIR),
                                           "--conversation_template_config", "{w}/bad/template_type.json"), 1,
     r"template_type.json: field 'chat_template': Input should be a valid string"),
    ("tokenizer-missing", prepare("sft", "{w}/in/sft.jsonl", "--tokenizer_dir", "{w}/nope"), 1,
     r"--tokenizer_dir .*nope: no such directory"),
    ("tokenizer-without-chat-template", prepare("sft", "{w}/in/sft.jsonl", "--tokenizer_dir", "{w}/plain"), 1,
     r"--tokenizer_dir .*plain: the tokenizer has no chat template and no --conversation_template_config was given"),
    ("rl-chat-prompts-without-template", ["grpo", "--pretrain", "{w}/plain", "--prompt_dataset", "{w}/prompt",
                                          "--reward_source", "arithmetic"], 2,
     r"--pretrain .*plain: the tokenizer has no chat template .*pass --conversation_template_config"),
    # --- CLI values ---------------------------------------------------------------------------------------------
    ("max-length-too-small", prepare("sft", "{w}/in/sft.jsonl", "--max_length", "4", *TINY), 2,
     r"--max_length \(prepare.max_length\): Input should be greater than or equal to 8 \(got '4'\)"),
    ("num-proc-zero", prepare("sft", "{w}/in/sft.jsonl", "--num_proc", "0", *TINY), 2,
     r"--num_proc \(prepare.num_proc\): Input should be greater than or equal to 1"),
    ("unknown-type", prepare("rl", "{w}/in/sft.jsonl", *TINY), 2,
     r"--type \(prepare.type\): Input should be 'sft', 'preference', 'prompt' or 'ptx' \(got 'rl'\)"),
    ("unknown-flag", prepare("sft", "{w}/in/sft.jsonl", "--frobnicate", "1", *TINY), 2,
     r"unknown flag '--frobnicate'"),
    ("unknown-command", ["train"], 2, r"rlhf-ray: unknown command 'train'"),
    ("negative-lr", SFT + ["--lr", "-1"], 2, r"--lr \(train.lr\): Input should be greater than 0 \(got '-1'\)"),
    ("negative-save-total-limit", SFT + ["--save_total_limit", "-1"], 2,
     r"--save_total_limit \(checkpoint.save_total_limit\): Input should be greater than or equal to 0"),
    ("zero-temperature", GRPO + ["--temperature", "0"], 2, r"--temperature 0.0: .*set a temperature > 0"),
    # --- YAML ---------------------------------------------------------------------------------------------------
    ("yaml-unknown-key", SFT + ["--config", "{w}/bad/yaml_key.yaml"], 2,
     r"yaml_key.yaml: unknown key 'train.lrr'. Did you mean: train.lr"),
    ("yaml-wrong-type", SFT + ["--config", "{w}/bad/yaml_type.yaml"], 2,
     r"yaml_type.yaml: train.lr: Input should be a valid number"),
    ("yaml-syntax", SFT + ["--config", "{w}/bad/yaml_syntax.yaml"], 2, r"yaml_syntax.yaml: not valid YAML"),
    ("yaml-missing", SFT + ["--config", "{w}/nope.yaml"], 2, r"--config .*nope.yaml: file not found"),
    # --- batch and buffer arithmetic ----------------------------------------------------------------------------
    ("fewer-rows-than-a-batch", SFT + ["--batch_size", "500"], 2,
     r"--dataset has 24 rows, fewer than one global batch: batch_size \(500\) × dp \(1\) × accumulation_steps "
     r"\(1\) = 500"),
    ("eval-rows-fewer-than-ranks", SFT + ["--eval_dataset", "{w}/sft", "--num_workers", "30"], 2,
     r"--eval_dataset has 24 rows, fewer than the 30 data-parallel ranks"),
    ("buffer-arithmetic", GRPO + ["--experience_batch_size", "3", "--n_samples_per_prompt", "4", "--batch_size", "5"],
     2, r"the buffer arithmetic does not hold: .* = 12 samples; .* = 10 samples .*Try --train_batch_size 6"),
    ("grpo-needs-groups", GRPO + ["--n_samples_per_prompt", "1"], 2,
     r"needs n_samples_per_prompt > 1 \(got 1\); set --n_samples_per_prompt 4 or more"),
    ("estimator-needs-critic", GRPO + ["--advantage_estimator", "gae"], 2,
     r"advantage_estimator='gae' needs a critic, which `rlhf-ray grpo` does not run"),
    # --- placement and backends ---------------------------------------------------------------------------------
    ("workers-not-multiple-of-tp", SFT + ["--num_workers", "3", "--tp", "2"], 2,
     r"num_workers \(3\) must be a multiple of tp \(2\): dp × tp = num_workers; set --num_workers 2"),
    ("unknown-plugin", SFT + ["--plugin", "bogus"], 2, r"--plugin 'bogus' is not a known training backend; choose"),
    ("colocate-without-reward-model", ["ppo", "--pretrain", "{w}/model", "--prompt_dataset", "{w}/prompt",
                                       "--reward_source", "arithmetic", "--colocate_critic_reward"], 2,
     r"--colocate_critic_reward needs a reward-model group, but --reward_source is 'arithmetic'"),
    # --- models, prepared data of the wrong type, reward functions ----------------------------------------------
    ("pretrain-not-a-model", ["sft", "--pretrain", "{w}/in", "--dataset", "{w}/sft"], 2,
     r"--pretrain .*/in: no config.json there; give an HF model directory"),
    ("sft-on-prompt-data", ["sft", "--pretrain", "{w}/model", "--dataset", "{w}/prompt"], 2,
     r"--dataset: .*/prompt \(summary.json says --type prompt\): column 'attention_mask' is missing .*"
     r"Re-run `rlhf-ray prepare --type sft"),
    ("dpo-on-sft-data", ["dpo", "--pretrain", "{w}/model", "--dataset", "{w}/sft"], 2,
     r"column 'chosen_input_ids' is missing for preference data"),
    ("grpo-on-sft-data", GRPO[:3] + ["--prompt_dataset", "{w}/sft", "--reward_source", "arithmetic"], 2,
     r"--prompt_dataset: .*column 'gt_answer' is missing for prompt data"),
    ("reward-model-missing", ["ppo", "--pretrain", "{w}/model", "--prompt_dataset", "{w}/prompt",
                              "--rm_checkpoint_path", "{w}/nope"], 2,
     r"--rm_checkpoint_path .*nope: no config.json there"),
    ("reward-fn-missing", ["grpo", "--pretrain", "{w}/model", "--prompt_dataset", "{w}/prompt",
                           "--reward_fn", "{w}/nofile.py:score"], 2,
     r"--reward_fn: reward function file .*nofile.py' does not exist"),
    ("reward-url-not-http", ["grpo", "--pretrain", "{w}/model", "--prompt_dataset", "{w}/prompt",
                             "--reward_source", "remote", "--reward_url", "ftp://scorer"], 2,
     r"--reward_url \(reward.reward_url\): .*give http://host:port/path"),
    # --- checkpoints --------------------------------------------------------------------------------------------
    ("checkpoint-missing", SFT + ["--checkpoint_path", "{w}/nockpt"], 2,
     r"--checkpoint_path .*nockpt: no such checkpoint directory"),
    ("checkpoint-dir-without-checkpoints", SFT + ["--checkpoint_path", "{w}/in"], 2,
     r"--checkpoint_path .*/in: neither a complete checkpoint"),
    ("checkpoint-corrupted", SFT + ["--checkpoint_path", "{w}/ckpts/step_2"], 2,
     r"step_2: engine_state.json .*(sha256|bytes).*; point it at an earlier step_N directory"),
    ("checkpoint-unfinished", SFT + ["--checkpoint_path", "{w}/ckpts/step_1"], 2,
     r"step_1: neither a complete checkpoint \(no COMPLETE marker\)"),
    ("checkpoints-all-broken", SFT + ["--checkpoint_path", "{w}/ckpts"], 2,
     r"ckpts: neither a complete checkpoint .*nor a directory holding a complete step_N checkpoint"),
]


@pytest.mark.parametrize("argv, status, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_one_clear_message(world, argv, status, message, capsys):
    before = _snapshot(world)
    assert main([arg.format(w=world) for arg in argv]) == status
    out, err = capsys.readouterr()
    assert re.search(message, err), err
    assert "Traceback" not in out + err and err.count("error") <= 1, err
    assert _snapshot(world) == before                     # nothing written, replaced or deleted


def test_the_corpus_is_at_least_forty_cases():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
