"""Training backends by name (`--plugin`), and `build_engine`, the one way trainers get an engine.

    engine = build_engine(cfg.parallel, cfg.train, lambda: load_causal_lm(cfg.model), num_training_steps,
                          model_cfg=cfg.model)

Every backend is a factory with one signature,
`(name, parallel, train, model_factory, num_training_steps, model_cfg) -> TrainEngine`, registered with
`@register_engine(name)`. The torch-native backends live in torch_native.py, the ColossalAI ones in colossal.py
(which imports colossalai only when one of them is built).
"""

from __future__ import annotations

import importlib
from typing import Callable

from torch import nn

from rlhf_ray.config.base import ConfigError
from rlhf_ray.engines import plugins
from rlhf_ray.engines.base import TrainEngine

EngineFactory = Callable[..., TrainEngine]

_ENGINES: dict[str, EngineFactory] = {}
_DOCS: dict[str, str] = {}
_VALIDATORS: dict[str, Callable] = {}
_BACKEND_MODULES = ("rlhf_ray.engines.torch_native", "rlhf_ray.engines.colossal")


def register_engine(name: str, doc: str = "", validate: Callable | None = None
                    ) -> Callable[[EngineFactory], EngineFactory]:
    """Decorator: register `factory` under `name`; a second registration of a name is refused.

    validate(name, parallel, train), when given, checks the settings without building anything (no model, no
    devices) and raises ValueError naming the flag; `validate_engine_config` runs it on the driver before Ray
    starts, and the factory runs it again on each rank.
    """

    def decorate(factory: EngineFactory) -> EngineFactory:
        if name in _ENGINES:
            raise ValueError(f"training backend {name!r} is already registered (by {_ENGINES[name].__module__})")
        _ENGINES[name] = factory
        _DOCS[name] = doc
        if validate is not None:
            _VALIDATORS[name] = validate
        return factory

    return decorate


def _load_backends() -> None:
    for module in _BACKEND_MODULES:
        importlib.import_module(module)


def known_engines() -> dict[str, str]:
    """{name: one-line description} of every registered backend."""
    _load_backends()
    return dict(sorted(_DOCS.items()))


def get_engine_factory(name: str) -> EngineFactory:
    _load_backends()
    if name not in _ENGINES:
        raise ValueError(f"--plugin {name!r} is not a known training backend; choose one of "
                         f"{', '.join(sorted(_ENGINES))}")
    return _ENGINES[name]


def validate_engine_config(parallel, train) -> None:
    """Refuse an unknown --plugin, or settings its backend cannot take (a GPU-only plugin with --gpus_per_worker 0
    included), with a ConfigError: the jobs call it on the driver before Ray starts. Whether CUDA is visible is
    checked again on the ranks, which may run on other nodes than the driver. A built-in name is checked from
    plugins.py without importing its backend."""
    try:
        if parallel.plugin in plugins.BUILTIN:
            validate = plugins.VALIDATORS.get(parallel.plugin)
        else:
            get_engine_factory(parallel.plugin)
            validate = _VALIDATORS.get(parallel.plugin)
        if validate is not None:
            validate(parallel.plugin, parallel, train)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def build_engine(parallel, train, model_factory: Callable[[], nn.Module], num_training_steps: int, *,
                 model_cfg=None) -> TrainEngine:
    """Build the backend named by `parallel.plugin` on this rank.

    parallel: ParallelSection; train: TrainSection; model_cfg: ModelSection (LoRA merge and export settings).
    model_factory builds the model on this rank (the engine seeds torch with train.seed first, so every rank
    builds the same weights; sharded torch-native backends call it inside models.meta_loading.defer_weights(), where
    load_causal_lm / load_value_model leave the checkpoint weights on the meta device for the engine to load shard by
    shard); num_training_steps sizes the LR schedule. Works in a single process (no process
    group, num_workers 1) and inside a WorkerGroup whose ranks have joined the default process group.
    """
    factory = get_engine_factory(parallel.plugin)      # the factory runs its own validation on this rank
    return factory(parallel.plugin, parallel, train, model_factory, num_training_steps, model_cfg)
