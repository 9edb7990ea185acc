"""Continuous batching with chunked prefill under a per-step token budget, and preemption by recompute.

Each step: running decodes first (one token each, oldest first), then running sequences whose prompt is still
being prefilled, then waiting requests in arrival order, each taking as many prompt tokens as the budget leaves.
When blocks run out, the newest running sequence is preempted (its blocks freed, its tokens recomputed later),
so the oldest requests keep making progress.

Under asynchronous scheduling a sequence may have a token still on the device (`num_pending`): it decodes on
that token (the model runner reads it from the device), but is not scheduled once its every token has been
sampled (`done_sampling`; it finishes when the engine reads the last one), nor readmitted after a preemption
until the pending token is read, so prompt chunks never hold a pending token.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from swiftlm.engine.kv_cache import BlockAllocator
from swiftlm.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the sequence's last token, so a new token is sampled after it."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq]
    num_preempted: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def decode_only(self) -> bool:
        return all(s.seq.num_computed_tokens == s.seq.num_tokens - 1 and s.num_new_tokens == 1 for s in self.scheduled)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.allocator = allocator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        preempted_before = self.num_preemptions
        # Decodes before partial prefills; arrival order within each group.
        order = sorted(self.running, key=lambda s: (s.num_tokens - s.num_computed_tokens > 1, s.metrics.arrival_time))
        for seq in order:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING or seq.done_sampling:
                continue  # preempted earlier in this loop, or only waiting for its last token to be read
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._reserve(seq, n, scheduled):
                continue
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_pending:
                break  # preempted with a token still on the device: it comes back once the engine has read it
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            need = self.allocator.blocks_needed(len(seq.block_table), seq.num_computed_tokens + n)
            if not self.allocator.can_allocate(need):
                break
            seq.block_table.extend(self.allocator.allocate(need))
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return SchedulerOutput(scheduled, self.num_preemptions - preempted_before)

    def _reserve(self, seq: Sequence, n: int, scheduled: list[ScheduledSeq]) -> bool:
        """Make room for `n` more tokens of `seq`, preempting the newest other running sequences if needed."""
        need = self.allocator.blocks_needed(len(seq.block_table), seq.num_computed_tokens + n)
        while not self.allocator.can_allocate(need):
            victim = self._newest_running(exclude=seq, scheduled=scheduled)
            if victim is None:
                self._preempt(seq)
                return False
            self._preempt(victim)
        seq.block_table.extend(self.allocator.allocate(need))
        return True

    def _newest_running(self, exclude: Sequence, scheduled: list[ScheduledSeq]) -> Sequence | None:
        taken = {id(s.seq) for s in scheduled}
        candidates = [s for s in self.running if s is not exclude and id(s) not in taken]
        return max(candidates, key=lambda s: s.metrics.arrival_time) if candidates else None

    def _preempt(self, seq: Sequence) -> None:
        self.allocator.free(seq.block_table)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Release a finished or aborted sequence wherever it is."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.allocator.free(seq.block_table)
        seq.block_table = []
        seq.status = SequenceStatus.FINISHED
