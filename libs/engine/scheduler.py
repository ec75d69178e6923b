"""Continuous batching with a token budget, chunked prefill and preemption by recompute.

There are no prefill or decode phases: each step gives every running request the tokens it still
needs (1 for a decoding request, the rest of the prompt for a prefilling one, capped by the budget),
then admits waiting requests into what is left. When the pool runs out of blocks the newest running
request is preempted: its blocks are freed and it goes back to the front of the queue to be
recomputed (its prefix is usually still cached, so recompute is cheap).

Order: each request has a rank (lower first; equal ranks keep their arrival order). The waiting queue
is kept in rank order, and a running request still prefilling gives its share of the step's budget
to a better-ranked waiting request (it takes what is left after it): a newcomer from a tenant with
little in flight starts in the next step instead of behind the chunks of another tenant's burst.
With every rank equal (the default) this is plain first come, first served.
"""

from __future__ import annotations

import time
from collections import deque
from typing import NamedTuple

from kvmesh.libs.engine.kv_cache_manager import KVCacheManager
from kvmesh.libs.engine.request import FinishReason, Request, RequestStatus


class ScheduledRequest(NamedTuple):
    request: Request
    num_new_tokens: int
    samples: bool  # this chunk reaches the end of the known tokens, so it yields the next token


class SchedulerOutput(NamedTuple):
    decodes: list[ScheduledRequest]  # one token each, batched together
    prefills: list[ScheduledRequest]  # prompt chunks (and recomputes after preemption)
    preempted: list[Request]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.decodes) + sum(s.num_new_tokens for s in self.prefills)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
    ) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.prefix_query_tokens = 0  # prompt tokens looked up in the prefix cache at first admission
        self.prefix_hit_tokens = 0  # ... and how many of them were found there

    def add(self, req: Request) -> None:
        """Queue behind every request of the same or a better rank (a scan from the back: O(1)
        while ranks are equal)."""
        i = len(self.waiting)
        while i and self.waiting[i - 1].rank > req.rank:
            i -= 1
        self.waiting.insert(i, req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []

        # A better-ranked request waits for room in the batch: running prefills ranked below it go
        # after it, with what is left of the budget (decodes never wait: one token each).
        room = self.waiting and len(self.running) < self.max_num_seqs
        first_waiting = self.waiting[0].rank if room else None
        deferred: list[Request] = []
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n > 1 and first_waiting is not None and req.rank > first_waiting:
                deferred.append(req)
                i += 1
                continue
            while not self.kv.allocate_slots(req, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            else:
                scheduled.append(self._scheduled(req, n))
                budget -= n
                i += 1

        if not preempted:
            # waiting requests ranked above a deferred prefill, then it, then the rest
            budget = self._admit(budget, scheduled, min(r.rank for r in deferred) if deferred else None)
            for req in deferred:  # without preempting anyone: a deferred chunk may wait a step
                n = min(req.num_tokens - req.num_computed_tokens, budget)
                if n > 0 and self.kv.allocate_slots(req, n):
                    scheduled.append(self._scheduled(req, n))
                    budget -= n
            budget = self._admit(budget, scheduled)

        decodes = [s for s in scheduled if s.num_new_tokens == 1 and s.samples]
        prefills = [s for s in scheduled if not (s.num_new_tokens == 1 and s.samples)]
        return SchedulerOutput(decodes, prefills, preempted)

    def _admit(
        self, budget: int, scheduled: list[ScheduledRequest], above: tuple[int, int] | None = None
    ) -> int:
        """Admit waiting requests (ranked better than `above`, if given) into the budget; returns
        what is left of it."""
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            if above is not None and not req.rank < above:
                break
            hits = self.kv.get_computed_blocks(req)
            num_hit_tokens = len(hits) * self.kv.block_size
            n = req.num_tokens - req.num_computed_tokens - num_hit_tokens
            if n > budget:
                if not self.enable_chunked_prefill:
                    break
                n = budget
            if not self.kv.allocate_slots(req, n, hits):
                break
            self.waiting.popleft()
            req.num_computed_tokens += num_hit_tokens
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit_tokens
                self.prefix_query_tokens += req.num_prompt_tokens
                self.prefix_hit_tokens += num_hit_tokens
                req.first_scheduled_time = time.monotonic()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled.append(self._scheduled(req, n))
            budget -= n
        return budget

    @staticmethod
    def _scheduled(req: Request, n: int) -> ScheduledRequest:
        return ScheduledRequest(req, n, req.num_computed_tokens + n == req.num_tokens)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def finish(self, req: Request, reason: FinishReason) -> None:
        """Take a request out of the queues and free its blocks at once."""
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
