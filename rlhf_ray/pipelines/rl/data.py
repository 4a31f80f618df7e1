"""Prompt and ptx rows for the RL job, and where each step reads them from.

Both are endless streams over seeded permutations (one permutation per pass over the data), addressed by position:
collect step k of the run reads prompts [k * B, (k + 1) * B) of the stream. Positions are pure functions of the
episode index, so resuming from episode e reads exactly what an uninterrupted run would have read, with no data
state in the checkpoint, and async mode can collect ahead without bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlhf_ray.config.base import ConfigError


def stream_indices(num_rows: int, start: int, count: int, seed: int, shuffle: bool) -> list[int]:
    """Row indices at stream positions [start, start + count): pass p is a permutation seeded by (seed, p)."""
    import torch

    if num_rows < 1:
        raise ValueError("cannot draw rows from an empty dataset")
    out, cache = [], {}
    for position in range(start, start + count):
        pass_index, offset = divmod(position, num_rows)
        if pass_index not in cache:
            cache[pass_index] = (torch.randperm(num_rows, generator=torch.Generator().manual_seed(
                seed * 1_000_003 + pass_index)).tolist() if shuffle else list(range(num_rows)))
        out.append(cache[pass_index][offset])
    return out


@dataclass
class RLData:
    prompts: list[dict]                 # {"input_ids": [...], "gt_answer": str | None}
    ptx: list[dict] | None = None       # {"input_ids", "attention_mask", "labels"}
    seed: int = 42
    shuffle: bool = True

    def prompt_rows(self, collect_index: int, batch: int, refill: int = 0) -> list[dict]:
        """The prompts of the run's collect step `collect_index` (0, 1, ... over all episodes). `refill` r > 0:
        dynamic sampling's r-th extra round for that step, from a stream of its own (seed shifted by r), so the
        main stream, and the prompts a resumed run reads, do not depend on how many refills ran."""
        picks = stream_indices(len(self.prompts), collect_index * batch, batch, self.seed + 7_919 * refill,
                               self.shuffle)
        return [self.prompts[i] for i in picks]

    def ptx_rows(self, episode: int, per_episode: int, dp_rank: int, dp: int) -> list[dict]:
        """This dp rank's ptx rows for one episode (each rank its own contiguous slice of the episode's rows)."""
        if not self.ptx:
            return []
        start = (episode * dp + dp_rank) * per_episode
        picks = stream_indices(len(self.ptx), start, per_episode, self.seed + 1, self.shuffle)
        return [self.ptx[i] for i in picks]


def _rows(paths: list[str], kind: str, flag: str) -> list[dict]:
    from rlhf_ray.data.loading import load_prepared_rows

    try:
        return load_prepared_rows(paths, kind)
    except ValueError as exc:
        raise ConfigError(f"--{flag}: {exc}") from None


def load_rl_data(cfg) -> RLData:
    prompts = [{"input_ids": list(row["input_ids"]), "gt_answer": row.get("gt_answer")}
               for row in _rows(cfg.data.prompt_dataset, "prompt", "prompt_dataset")]
    if not prompts:
        raise ConfigError(f"--prompt_dataset {cfg.data.prompt_dataset}: no rows")
    ptx = None
    if cfg.algorithm.ptx_coef > 0:
        ptx = _rows(cfg.data.pretrain_dataset, "ptx", "pretrain_dataset")
        if not ptx:
            raise ConfigError(f"--pretrain_dataset {cfg.data.pretrain_dataset}: no rows")
    return RLData(prompts, ptx, seed=cfg.train.seed, shuffle=cfg.data.shuffle)


@dataclass(frozen=True)
class TemplateIds:
    """Token ids the RL job takes from the conversation template."""

    stop_ids: tuple[int, ...]     # end an assistant turn: generation stops at them (besides the model's EOS)
    end_ids: tuple[int, ...]      # the assistant line end ('<|im_end|>\n'): what prepare put after each response


def template_ids(path: str | None, tokenizer) -> TemplateIds:
    """From --conversation_template_config, else derived from the tokenizer's chat template (as `rlhf-ray
    prepare` does), else just the EOS token."""
    from rlhf_ray.data.template import load_template
    from rlhf_ray.data.template_derive import derive_template

    eos = (int(tokenizer.eos_token_id),) if tokenizer.eos_token_id is not None else ()
    if path:
        if not Path(path).is_file():
            raise ConfigError(f"--conversation_template_config {path}: no such file")
        try:
            template = load_template(path, tokenizer, write_back=False)
        except ValueError as exc:
            raise ConfigError(f"--conversation_template_config {path}: {exc}") from None
    else:
        try:
            template = derive_template(tokenizer, None, None, source="the tokenizer's chat template")
        except ValueError:
            return TemplateIds(eos, eos)
    end_ids = tuple(tokenizer(template.assistant_line_end, add_special_tokens=False)["input_ids"]) or eos
    return TemplateIds(tuple(int(i) for i in template.stop_ids) or eos, end_ids)
