"""A request's state as it moves through the engine: tokens, KV blocks, progress and finish status."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from swiftlm.outputs import RequestMetrics, TokenLogprob
from swiftlm.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One generation. `token_ids` = prompt + the output tokens the host has seen; `num_pending` more were sampled
    on the device by steps still in flight (asynchronous scheduling), the last of them at row `pending_row` of
    the latest step's samples. `num_computed_tokens` of all `num_tokens` have KV in the cache."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    max_tokens: int
    eos_token_ids: list[int]
    metrics: RequestMetrics
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprobs: list[TokenLogprob] | None = None
    detokenizer: object | None = None
    num_pending: int = 0
    pending_row: int = -1

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs = []

    @property
    def num_tokens(self) -> int:
        """Known and pending tokens: what the scheduler computes and positions count."""
        return len(self.token_ids) + self.num_pending

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Generated tokens, pending ones included (the index of the next token to sample)."""
        return self.num_tokens - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """The generated tokens the host has seen."""
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def done_sampling(self) -> bool:
        """Every token it may generate has been sampled (some may still be pending)."""
        return self.num_output_tokens >= self.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
