"""What defines an evaluation run (:class:`EvalConfig`, the ``chunkkv eval`` flags as a dataclass),
importable without torch so the command checks its flags and its output folder before anything
heavy is loaded."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ChunkKVError

if TYPE_CHECKING:
    from ..methods import Method

__all__ = ["EvalConfig", "describe_method"]

#: Settings that may change between a run and its resumption.
_RESUMABLE = {"out_dir", "limit", "progress", "overwrite", "model_max_positions"}
_BOUNDS = ("prefill_chunk", "decode_budget", "compress_every")


@dataclass
class EvalConfig:
    """Everything that defines an evaluation run (the CLI flags, as a dataclass).

    Common: ``task`` (``niah``, ``longbench[:t,…]``, ``gsm8k``, ``jailbreakv``, ``synthetic[:t,…]``),
    ``out_dir``, ``limit`` (samples per subtask), ``query_aware``, ``chat_template`` (None = use it
    if the tokenizer has one), ``max_new_tokens`` (overrides the benchmark's), ``system_prompt``, ``chat_template_kwargs``,
    sampling (``do_sample``, ``temperature``, ``top_p``, ``seed``).
    Data: ``data_dir``, ``data_file``. LongBench: ``max_length``. NIAH: ``lengths``, ``depths``,
    ``needle``, ``retrieval_question``, ``answer``, ``haystack_dir``, ``haystack``. GSM8K: ``num_shots``,
    ``shots_file``. JailbreakV: ``judge_model``, ``jb_formats``, ``jb_field``. Synthetic:
    ``lengths``, ``depths``, ``num_samples``, ``seed``, ``synthetic_haystack``.
    """

    task: str
    out_dir: str
    limit: int | None = None
    query_aware: bool = False
    chat_template: bool | None = None
    max_new_tokens: int | None = None
    system_prompt: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float | None = None
    seed: int = 0
    data_dir: str | None = None
    data_file: str | None = None
    max_length: int | None = None
    lengths: list[int] | None = None
    depths: list[float] | None = None
    needle: str | None = None
    retrieval_question: str | None = None
    answer: str | None = None
    haystack_dir: str | None = None
    haystack: str = "auto"
    num_shots: int = 8
    shots_file: str | None = None
    judge_model: str | None = None
    jb_formats: list[str] | None = None
    jb_field: str | None = None
    num_samples: int = 10
    synthetic_haystack: str = "varied"
    prefill_chunk: int | None = None
    decode_budget: int | None = None
    compress_every: int | None = None
    model_name: str = ""
    dtype: str = ""
    model_max_positions: int | None = None
    progress: bool = True
    overwrite: bool = False

    def __post_init__(self) -> None:
        _check_numbers(self)

    def fingerprint(self, method: Method | None) -> dict[str, Any]:
        """The settings a resumed run must share with the run that wrote the folder."""
        data = {k: v for k, v in dataclasses.asdict(self).items() if k not in _RESUMABLE}
        for key in _BOUNDS:  # unset: absent, so folders written before these options still resume
            if data.get(key) is None:
                data.pop(key, None)
        data["method"] = describe_method(method)
        return json.loads(json.dumps(data))


def _check_numbers(config: EvalConfig) -> None:
    """Reject counts and lengths that would silently run something else than asked."""
    if config.limit is not None:
        if isinstance(config.limit, bool) or not isinstance(config.limit, int) or config.limit < 0:
            raise ChunkKVError(f"--limit {config.limit} must be a whole number >= 1 (samples per subtask)")
        if config.limit == 0:
            raise ChunkKVError("--limit 0 selects no samples, so nothing would run; give --limit N >= 1, "
                               "or leave it out to run every sample")
    for name, value, low in (("--max-new-tokens", config.max_new_tokens, 1), ("--max-length", config.max_length, 1),
                             ("--num-samples", config.num_samples, 1), ("--num-shots", config.num_shots, 0)):
        if value is not None and value < low:
            raise ChunkKVError(f"{name} {value} must be >= {low}")
    bad = [n for n in config.lengths or [] if n < 1]
    if bad:
        raise ChunkKVError(f"--lengths {bad[0]} is not a context length: every length must be >= 1 token")
    bad_depths = [d for d in config.depths or [] if not 0 <= d <= 100]
    if bad_depths:
        raise ChunkKVError(f"--depths {bad_depths[0]:g} is not a percentage in 0..100 (needle depth in the context)")
    if config.temperature is not None and config.do_sample and config.temperature <= 0:
        raise ChunkKVError(f"--temperature {config.temperature} must be > 0 when sampling")
    if config.top_p is not None and not 0 < config.top_p <= 1:
        raise ChunkKVError(f"--top-p {config.top_p} must be in (0, 1]")
    from ..synthetic import HAYSTACKS  # torch-free, like this module

    if config.synthetic_haystack not in HAYSTACKS:
        raise ChunkKVError(f"--synthetic-haystack {config.synthetic_haystack!r} is not one of {', '.join(HAYSTACKS)}")


def describe_method(method: Method | None) -> dict[str, Any]:
    """``{"name": ..., <fields>}`` of a method (FullKV when None), JSON-ready."""
    from ..methods import FullKV

    method = method or FullKV()
    return {"name": method.name, **method.settings()}
