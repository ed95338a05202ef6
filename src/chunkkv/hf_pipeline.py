"""``pipeline("chunkkv-text-generation")``: compress a context once, answer many questions on it.

:func:`register_pipeline` adds the task to transformers' ``PIPELINE_REGISTRY`` (offline: nothing
is downloaded; pass the model and tokenizer you loaded)::

    chunkkv.register_pipeline()
    pipe = pipeline("chunkkv-text-generation", model=model, tokenizer=tokenizer)
    pipe(context, questions=["Who ...?", "When ...?"])["answers"]

Each call is one :func:`chunkkv.generate`: by default the context is compressed once, before any
question is known, with the question-agnostic default (:func:`chunkkv.agnostic.agnostic_method`),
and every question is answered on that compressed cache; ``query_aware=True`` compresses context +
question once per question instead (the papers' setting).
"""

from __future__ import annotations

from typing import Any

from transformers import AutoModelForCausalLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .budget import DEFAULT_KEEP_FRACTION
from .errors import ChunkKVError
from .generation import Sampling, generate
from .methods import ChunkKV, Method, make_method

__all__ = ["TASK", "ChunkKVPipeline", "register_pipeline"]

#: The task name ``pipeline()`` knows after :func:`register_pipeline`.
TASK = "chunkkv-text-generation"

_SAMPLING = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "seed")
_GENERATE = ("query_aware", "answer_prefix", "chat_template", "scoring", "prefill_chunk", "decode_budget",
             "compress_every")


def default_method() -> Method:
    """What the pipeline compresses with when no ``method`` is given: ChunkKV keeping 10 %."""
    return ChunkKV(keep_fraction=DEFAULT_KEEP_FRACTION)


def _method(method: Method | str | None) -> Method:
    if method is None:
        return default_method()
    if isinstance(method, str):
        key = method.lower().replace("_", "").replace(" ", "")
        if key in ("full", "fullkv", "none"):
            return make_method("full")
        return make_method(method, keep_fraction=DEFAULT_KEEP_FRACTION)  # the library's one default budget
    if not isinstance(method, Method):
        raise ChunkKVError(f"method must be a chunkkv method or a name, got {type(method).__name__}")
    return method


class ChunkKVPipeline(Pipeline):
    """Answer questions about a long context on a compressed KV cache.

    ``pipe(context, question="...")`` returns ``{"answer": str}``; ``pipe(context, questions=[...])``
    returns ``{"answers": [str, ...]}`` (a list of contexts gives a list of those). Options, at
    construction or per call:

    * ``method``: a :mod:`chunkkv.methods` method or a name (``"chunkkv"``, ``"snapkv"`` … keep 10 %;
      ``"full"``: no compression). Default: ``ChunkKV(keep_fraction=0.1)``.
    * ``query_aware``: False (default) compresses the context once for every question, with the
      question-agnostic default; True compresses context + question, once per question.
    * ``answer_prefix``: text the answer starts with, fed after the question (not returned).
    * ``max_new_tokens`` (default 32), ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``seed``.
    * ``chat_template``, ``scoring``, ``prefill_chunk``, ``decode_budget``, ``compress_every``: as in
      :func:`chunkkv.generate`.
    """

    _pipeline_calls_generate = False  # chunkkv decodes itself (chunkkv.generate)

    def _sanitize_parameters(self, question: str | None = None, questions: list[str] | None = None,
                             method: Method | str | None = None, **kwargs: Any):
        unknown = sorted(set(kwargs) - set(_SAMPLING) - set(_GENERATE))
        if unknown:
            raise ChunkKVError(f"{TASK}: unknown option(s) {', '.join(unknown)}; known: method, question, questions, "
                               f"{', '.join(_GENERATE + _SAMPLING)}")
        preprocess = {}
        if question is not None or questions is not None:
            preprocess = {"question": question, "questions": questions}
        forward = {k: v for k, v in kwargs.items() if v is not None}
        if method is not None:
            forward["method"] = method
        postprocess = {"single": questions is None} if preprocess else {}
        return preprocess, forward, postprocess

    def preprocess(self, context: str, question: str | None = None, questions: list[str] | None = None) -> dict:
        if not isinstance(context, str) or not context.strip():
            raise ChunkKVError(f"{TASK}: the context must be a non-empty text")
        if (question is None) == (questions is None):
            raise ChunkKVError(f"{TASK}: give question='...' or questions=[...] (one of the two)")
        asked = [question] if questions is None else list(questions)
        if not asked or not all(isinstance(q, str) and q for q in asked):
            raise ChunkKVError(f"{TASK}: questions must be non-empty texts")
        return {"context": context, "questions": asked}

    def _forward(self, model_inputs: dict, method: Method | str | None = None, **kwargs: Any) -> dict:
        sampling = {k: kwargs.pop(k) for k in _SAMPLING if k in kwargs}
        impl = self.model.config._attn_implementation
        try:
            result = generate(self.model, self.tokenizer, model_inputs["context"], model_inputs["questions"],
                              _method(method), sampling=Sampling(**sampling), **kwargs)
        finally:  # no compressed context leaves the call: the model goes back to its own attention
            if self.model.config._attn_implementation != impl:
                self.model.set_attn_implementation(impl)
        return {"answers": [a.texts[0] for a in result.answers]}

    def postprocess(self, model_outputs: dict, single: bool = True) -> dict:
        answers = model_outputs["answers"]
        return {"answer": answers[0]} if single else {"answers": answers}


def register_pipeline() -> str:
    """Register :data:`TASK` with transformers' pipeline registry (idempotent); returns the task name."""
    if PIPELINE_REGISTRY.supported_tasks.get(TASK, {}).get("impl") is not ChunkKVPipeline:
        PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=ChunkKVPipeline, pt_model=AutoModelForCausalLM)
    return TASK


register_pipeline()
