"""Pipelines: what a row becomes and what comes back.

Built-ins: ``generate``, ``embed`` and ``openai`` (the requests of an OpenAI batch file: chat
completions for a generate model, embeddings for an embed model). A user pipeline is any
importable class with the interface of :class:`pipelines.base.Pipeline`, named in the job as
``module:Class``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from batch.errors import SpecError

if TYPE_CHECKING:
    from batch.spec import JobSpec
    from pipelines.base import Pipeline

BUILTIN = {"generate": "pipelines.generate:Generate", "embed": "pipelines.embed:Embed"}
#: pipeline openai, per model.task.
OPENAI = {"generate": "pipelines.openai:OpenAIChat", "embed": "pipelines.openai:OpenAIEmbeddings"}


def load_pipeline(spec: JobSpec) -> Pipeline:
    """Instantiate the pipeline a job names, with its ``pipeline_options``."""
    name = spec.pipeline_name
    target = OPENAI[spec.model.task] if name == "openai" else BUILTIN.get(name, name)
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(
            f"pipeline: cannot import module '{module_name}' ({exc}); make it importable "
            "(installed, or on PYTHONPATH) or name a built-in: generate, embed, openai"
        ) from None
    cls: Any = getattr(module, class_name, None)
    if cls is None:
        raise SpecError(f"pipeline: module '{module_name}' has no class '{class_name}'")
    task = getattr(cls, "task", None)
    if task != spec.model.task:
        raise SpecError(
            f"pipeline: {target} is a '{task}' pipeline but model.task is '{spec.model.task}'"
        )
    try:
        return cls(spec, **spec.pipeline_options)
    except TypeError as exc:
        raise SpecError(f"pipeline_options: {exc}") from None
