"""Can this job handle this model? Asked on the driver before Ray or any actor starts, so that a model the job cannot
use is refused in seconds, with one message naming the file and the fix, and not after loading or training.

    check_vllm_serves(cfg.model.pretrain, "--pretrain")     # grpo/ppo generating with --backend vllm
    check_chat_template(tokenizer, tokenizer_dir, cfg.data.conversation_template_config)    # chat prompts

Both raise ConfigError (a ValueError), which the jobs print as one line.
"""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

from rlhf_ray.config.base import ConfigError

TEMPLATE_FLAG = "--conversation_template_config"


def _registry_table(registry_file: Path, table: str) -> frozenset[str]:
    """The string keys of the dict literal assigned to `table` at module level in `registry_file` (empty if none)."""
    for node in ast.parse(registry_file.read_text()).body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                and any(isinstance(t, ast.Name) and t.id == table for t in node.targets)):
            return frozenset(key.value for key in node.value.keys
                             if isinstance(key, ast.Constant) and isinstance(key.value, str))
    return frozenset()


def vllm_generation_architectures() -> frozenset[str] | None:
    """The architectures vLLM generates text with natively; None when vLLM is not installed.

    Importing vLLM's model registry costs ~7 s of CPU (torch and vLLM's config machinery) on the driver, which
    otherwise never imports vLLM; its `_TEXT_GENERATION_MODELS` table is a literal dict, so it is read from the source
    file. A vLLM release that moves the table gets the import instead."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    registry_file = Path(spec.submodule_search_locations[0]) / "model_executor" / "models" / "registry.py"
    archs = _registry_table(registry_file, "_TEXT_GENERATION_MODELS") if registry_file.is_file() else frozenset()
    if not archs:
        from vllm.model_executor.models.registry import ModelRegistry

        archs = frozenset(ModelRegistry.get_supported_archs())
    return archs


def _transformers_backend_serves(arch: str) -> bool:
    """vLLM falls back to its Transformers backend for an architecture whose transformers class supports pluggable
    attention (`_supports_attention_backend`)."""
    import transformers

    return bool(getattr(getattr(transformers, arch, None), "_supports_attention_backend", False))


def check_vllm_serves(model_dir: str, flag: str = "--pretrain") -> None:
    """ConfigError naming the architecture, config.json and the fix when vLLM cannot generate with this model."""
    config_file = Path(model_dir) / "config.json"
    archs = vllm_generation_architectures()
    if archs is None or not config_file.is_file():
        return                  # no vLLM: the generator reports that itself; no model: --pretrain's own check does
    declared = json.loads(config_file.read_text()).get("architectures") or []
    for arch in declared:
        if arch not in archs and not _transformers_backend_serves(arch):
            raise ConfigError(f"{flag} {model_dir}: vLLM cannot generate with architecture {arch!r} (named in "
                              f"{config_file}): it is neither in vLLM's model registry nor servable by its "
                              f"Transformers backend. Generate with transformers instead: --backend hf")


def check_chat_template(tokenizer, tokenizer_dir: str, template_config: str | None,
                        flag: str = "--tokenizer_dir") -> None:
    """ConfigError naming the tokenizer directory and the flag that gives a template, when the job must render
    conversations and the tokenizer has no chat template of its own and none was given."""
    if template_config or getattr(tokenizer, "chat_template", None):
        return
    raise ConfigError(f"{flag} {tokenizer_dir}: the tokenizer has no chat template and no {TEMPLATE_FLAG} was given, "
                      f"so a conversation cannot be rendered; pass {TEMPLATE_FLAG} with a JSON file holding the "
                      f"model's chat_template (rlhf_ray/assets/templates/ has examples)")


def check_rl_models(cfg, tokenizer) -> None:
    """The RL jobs' model checks: vLLM serves the policy (when it generates), and the prompts' chat format can be
    ended (a prompt dataset that `rlhf-ray prepare` rendered with a chat template needs the template's stop markers,
    from --conversation_template_config or the tokenizer's own)."""
    from rlhf_ray.data.loading import load_summary

    if cfg.generator.backend == "vllm":
        check_vllm_serves(cfg.model.pretrain)
    if any(load_summary(path).get("template") for path in cfg.data.prompt_dataset):
        flag = "--tokenizer_dir" if cfg.model.tokenizer_dir else "--pretrain"
        check_chat_template(tokenizer, cfg.model.resolved_tokenizer_dir(), cfg.data.conversation_template_config, flag)
