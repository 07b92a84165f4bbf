"""Data contracts between the rollout engine, rewards, estimators and trainers (shape-commented).

N = B*G completions (B prompts x G generations), P padded prompt length, Lc completion length, S steps,
Lb block length, E trace events.

- SequenceBatch: prompt + completion pairs to score (SFT targets, preference pairs).
- RolloutBatch: what a rollout returns: completions, their canvas and the commit trace.
- Trace: every decision the sampler made (TraceRL arXiv 2509.06949, DCoLT arXiv 2505.10446 replay it).
- StepStats: the per-step statistics the commit and ordering rules read.
- PlanBatch: what an autoregressive planner wrote for each row (hybrid rollouts: rollout/hybrid.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

COMMIT, REMASK, FILL = 0, 1, 2  # event kinds: sampled commit; remask (self-correction or an edit); filled after EOS
DELETE, INSERT = 3, 4  # any-process edits: a position removed; masks opened after a position (count in `token`)


@dataclass(frozen=True)
class Decoding:
    """The sampler settings a replay of its decisions needs (recorded in every Trace)."""

    temperature: float = 0.0  # token temperature (0 = greedy)
    order: str = "low_confidence"  # the ordering rule (policy.orders.ORDERS)
    order_temperature: float = 0.0  # > 0: orders were sampled Plackett-Luce (Trace.order_logprob holds them)
    block_length: int = 0  # semi-autoregressive block length (the completion length for one block)
    top_k: int = 0  # token filters (recorded by any-process rollouts, whose likelihood applies them)
    top_p: float = 1.0
    edit: str = "none"  # any-process decoding (rollout.edit): none | remask | any
    edit_temperature: float = 0.0  # the edit decisions' temperature (0: argmax, no probability recorded)
    edit_max_per_step: int = 0  # the limits the edit decisions were drawn under (policy.edits.EditLimits)
    edit_max_insert: int = 0
    edit_max_length: int = 0  # the completion's capacity
    min_p: float = 0.0  # TRL's samplers (the host loop): recorded so an estimator can say it does not replay them
    repetition_penalty: float = 1.0


@dataclass
class Trace:
    """Every decision a rollout made, enough to replay the exact sequence of its canvases (`replay`).

    Steps are counted per row: step s of a row is its s-th forward, whatever the other rows did. Besides the
    decisions it records how they were made (the sampler settings a replay needs), so a likelihood
    estimator reads them from the trace rather than from a recipe.

    Any-process rollouts (rollout.edit, rollout/anyprocess.py) change the canvas length: their events' positions
    index the canvas *before* the event's step (an INSERT's position -1 is the gap after the prompt, its token
    column the number of masks opened), a step's events apply together (`edit_canvas`), and `lengths`,
    `edit_on` and `edit_logprob` are set (None otherwise). commit_step and token_logprob then describe the
    positions of the final canvas.
    """

    commit_step: torch.Tensor  # [N, Lc] step of the final token's commit; -1 = filled after EOS (not sampled)
    token_logprob: torch.Tensor  # [N, Lc] sampler log-prob of the final token at its commit step
    order_logprob: torch.Tensor  # [N, S] log-prob of each step's unmasking decision (0 when not sampled)
    num_steps: torch.Tensor  # [N] steps taken per row
    events: torch.Tensor  # [E, 5] long: (row, step, position, token, kind), row by row in the order applied
    event_logprob: torch.Tensor  # [E] sampler log-prob of committed tokens (0 for remask / fill)
    mask_token_id: int
    decoding: Decoding = field(default_factory=lambda: Decoding())  # how the decisions were made
    lengths: torch.Tensor | None = None  # [N, S+1] completion length before each step, and after the last
    edit_on: torch.Tensor | None = None  # [N, S] bool: the step drew edit decisions (each KEEP had a probability)
    edit_logprob: torch.Tensor | None = None  # [N, S] the step's edit decisions' log-prob, KEEPs included

    EVENT_FIELDS = ("row", "step", "position", "token", "kind")  # the columns of `events`
    EDIT_FIELDS = ("lengths", "edit_on", "edit_logprob")  # per-row fields of any-process rollouts

    def replay(self, row: int) -> list[torch.Tensor]:
        """Completion canvases of `row` after each of its steps: a list of num_steps [Lc] tensors (of the
        lengths the canvas had, for any-process rollouts)."""
        Lc = self.commit_step.shape[1] if self.lengths is None else int(self.lengths[row, 0])
        canvas = torch.full((Lc,), self.mask_token_id, dtype=torch.long)
        ev = self.events[self.events[:, 0] == row]
        states = []
        for s in range(int(self.num_steps[row])):
            step = ev[ev[:, 1] == s]
            if self.lengths is None:  # fixed canvas: events apply in place, in order
                for _, _, pos, tok, _ in step.tolist():
                    canvas[pos] = tok
            else:
                canvas = edit_canvas(canvas, step, self.mask_token_id)
            states.append(canvas.clone())
        return states

    def to(self, device) -> "Trace":
        return replace(self, **{k: v.to(device) for k, v in self.__dict__.items() if torch.is_tensor(v)})

    def select(self, rows: torch.Tensor) -> "Trace":
        """The trace of rows `rows` in that order, renumbered 0..len(rows)-1 (a row may be taken twice): the events
        stay row by row, each row's in the order applied."""
        rows = rows.cpu()
        order = torch.argsort(self.events[:, 0], stable=True)  # row by row, each row's events in order
        counts = torch.bincount(self.events[:, 0], minlength=self.commit_step.shape[0])
        starts = counts.cumsum(0) - counts
        c = counts[rows]
        new_row = torch.repeat_interleave(torch.arange(len(rows)), c)
        offset = torch.arange(int(c.sum())) - torch.repeat_interleave(c.cumsum(0) - c, c)
        take = order[starts[rows][new_row] + offset]
        events = self.events[take].clone()
        events[:, 0] = new_row
        return replace(
            self,
            commit_step=self.commit_step[rows],
            token_logprob=self.token_logprob[rows],
            order_logprob=self.order_logprob[rows],
            num_steps=self.num_steps[rows],
            events=events,
            event_logprob=self.event_logprob[take],
            **{k: getattr(self, k)[rows] for k in self.EDIT_FIELDS if getattr(self, k) is not None},
        )

    @staticmethod
    def concat(parts: list["Trace"]) -> "Trace":
        """The traces of consecutive row ranges as one (rows renumbered; step columns padded to the longest)."""
        S = max(t.order_logprob.shape[1] for t in parts)
        first = [0]
        for t in parts[:-1]:
            first.append(first[-1] + t.commit_step.shape[0])
        events = [t.events + torch.tensor([o, 0, 0, 0, 0]) for t, o in zip(parts, first)]
        return replace(
            parts[0],
            commit_step=torch.cat([t.commit_step for t in parts]),
            token_logprob=torch.cat([t.token_logprob for t in parts]),
            order_logprob=torch.cat(
                [torch.nn.functional.pad(t.order_logprob, (0, S - t.order_logprob.shape[1])) for t in parts]
            ),
            num_steps=torch.cat([t.num_steps for t in parts]),
            events=torch.cat(events),
            event_logprob=torch.cat([t.event_logprob for t in parts]),
            **{
                k: torch.cat([_pad_steps(getattr(t, k), S + (k == "lengths"), k == "lengths") for t in parts])
                for k in Trace.EDIT_FIELDS
                if getattr(parts[0], k) is not None
            },
        )


def _pad_steps(x: torch.Tensor, width: int, hold: bool) -> torch.Tensor:
    """x [N, s] padded on the right to `width` step columns: with zeros, or (hold) with each row's last value, as
    the completion length stays after a row's last step."""
    if not hold:
        return torch.nn.functional.pad(x, (0, width - x.shape[1]))
    return torch.cat([x, x[:, -1:].expand(-1, width - x.shape[1])], 1)


def edit_canvas(canvas: torch.Tensor, events: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """The canvas after one any-process step: canvas [L] and that step's events [e, 5], whose positions index
    `canvas`, all applied together (AP-MDM's transition, arXiv 2510.06190 Algorithm 1): position i is dropped
    (DELETE) or emits the token its last COMMIT / REMASK / FILL event wrote (else its own), then the masks an
    INSERT at i opened; an INSERT at -1 opens masks before position 0. Returns the new canvas [L']."""
    L = canvas.shape[0]
    token = canvas.clone()
    deleted = torch.zeros(L + 1, dtype=torch.bool)
    opened = torch.zeros(L + 1, dtype=torch.long)  # [gap 0 | after position 0 | ...]
    for _, _, pos, tok, kind in events.tolist():
        if kind == DELETE:
            deleted[pos] = True
        elif kind == INSERT:
            opened[pos + 1] += tok
        else:
            token[pos] = tok
    pieces = [torch.full((int(opened[0]),), mask_token_id, dtype=torch.long)]
    for i in range(L):
        if not deleted[i]:
            pieces += [token[i : i + 1], torch.full((int(opened[i + 1]),), mask_token_id, dtype=torch.long)]
    return torch.cat(pieces)


@dataclass
class StepStats:
    """Dense per-position statistics of the active block for the rows decoded this step: [n, Lb] each."""

    masked: torch.Tensor  # bool: still masked
    token: torch.Tensor  # proposed token (valid where masked)
    logprob: torch.Tensor  # sampler log-prob of the proposed token
    confidence: torch.Tensor  # model probability of the proposed token (0 where not masked)
    top_prob: torch.Tensor  # model probability of the most likely token (equals confidence when greedy)
    margin: torch.Tensor
    gap: torch.Tensor
    entropy: torch.Tensor
    steps_left: torch.Tensor  # [n] planned steps left in this block, >= 1
    progress: torch.Tensor  # [n] fraction of the completion already committed

    @classmethod
    def scatter(cls, choice, m: torch.Tensor, mask_id: int) -> "StepStats":
        """Token choices at the masked positions (kernels.TokenChoice, [m.sum()] each) -> StepStats [n, Lb], filled
        where not masked (steps_left and progress are left to the caller)."""

        def dense(values, fill):
            out = torch.full(m.shape, fill, dtype=values.dtype, device=m.device)
            out[m] = values
            return out

        return cls._filled(choice, m, mask_id, dense)

    @classmethod
    def where(cls, choice, m: torch.Tensor, mask_id: int) -> "StepStats":
        """Token choices of every position ([m.numel()] each) -> StepStats [n, Lb], filled where not masked; no
        boolean indexing, so shapes stay static (rollout/step.py, CUDA graphs)."""

        def dense(values, fill):
            values = values.view(m.shape)
            return torch.where(m, values, torch.full_like(values, fill))

        return cls._filled(choice, m, mask_id, dense)

    @classmethod
    def _filled(cls, choice, m: torch.Tensor, mask_id: int, dense) -> "StepStats":
        return cls(
            masked=m,
            token=dense(choice.token, mask_id),
            logprob=dense(choice.logprob, 0.0),
            confidence=dense(choice.confidence, 0.0),
            top_prob=dense(choice.top_prob, 0.0),
            margin=dense(choice.margin, 0.0),
            gap=dense(choice.gap, 0.0),
            entropy=dense(choice.entropy, 0.0),
            steps_left=None,
            progress=None,
        )


@dataclass
class SequenceBatch:
    """Prompt + completion pairs to score (SFT targets, preference pairs)."""

    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, Lc]
    completion_mask: torch.Tensor  # [N, Lc] positions that count in the loss

    def select(self, rows: torch.Tensor) -> "SequenceBatch":
        return SequenceBatch(*(t[rows.to(t.device)] for t in self.__dict__.values()))

    def to(self, device) -> "SequenceBatch":
        return SequenceBatch(*(t.to(device) for t in self.__dict__.values()))

    def __len__(self) -> int:
        return self.completion_ids.shape[0]


@dataclass
class PlanBatch:
    """Plans written by an autoregressive planner (models/ar.py), one per row; T plan tokens.

    logprobs are the planner's own log-probs of its tokens under the distribution it sampled from (its
    temperature, top-k, top-p), so a teacher-forced forward of the planner gives them back (models.ar).
    Plans that were not sampled (content-free, oracle, corrupted) have planner_mask all 0 and logprobs 0.
    """

    prompt_ids: torch.Tensor  # [N, Pp] left-padded planner prompt
    prompt_mask: torch.Tensor  # [N, Pp]
    plan_ids: torch.Tensor  # [N, T] right-padded
    plan_mask: torch.Tensor  # [N, T] 1 = sampled token that counts (up to and including the planner's EOS)
    logprobs: torch.Tensor  # [N, T] sampler log-probs (0 where plan_mask is 0)
    # the plans as written, whole; executor_prompts holds them as placed, where one may be cut to fit the
    # executor's context (rollout.hybrid.fit_plans; plans/cut_fraction counts them)
    texts: list[str]
    kind: str = "real"  # none | content_free | real | oracle | other_problem | corrupted (rollout.hybrid)
    executor_prompts: list = field(default_factory=list)  # the prompts the executor decoded (plans placed)

    def select(self, rows: torch.Tensor) -> "PlanBatch":
        pick = lambda t: t[rows.to(t.device)]
        return replace(
            self,
            prompt_ids=pick(self.prompt_ids),
            prompt_mask=pick(self.prompt_mask),
            plan_ids=pick(self.plan_ids),
            plan_mask=pick(self.plan_mask),
            logprobs=pick(self.logprobs),
            texts=[self.texts[i] for i in rows.tolist()],
            executor_prompts=[self.executor_prompts[i] for i in rows.tolist()] if self.executor_prompts else [],
        )

    def to(self, device) -> "PlanBatch":
        return replace(self, **{k: v.to(device) for k, v in self.__dict__.items() if torch.is_tensor(v)})

    @staticmethod
    def concat(parts: list["PlanBatch"]) -> "PlanBatch":
        """Rows in order; prompts re-padded on the left, plans on the right, to the longest."""
        P = max(b.prompt_ids.shape[1] for b in parts)
        T = max(b.plan_ids.shape[1] for b in parts)
        left = lambda t: torch.nn.functional.pad(t, (P - t.shape[1], 0))
        right = lambda t: torch.nn.functional.pad(t, (0, T - t.shape[1]))
        return PlanBatch(
            torch.cat([left(b.prompt_ids) for b in parts]),
            torch.cat([left(b.prompt_mask) for b in parts]),
            torch.cat([right(b.plan_ids) for b in parts]),
            torch.cat([right(b.plan_mask) for b in parts]),
            torch.cat([right(b.logprobs) for b in parts]),
            [t for b in parts for t in b.texts],
            parts[0].kind,
            [p for b in parts for p in b.executor_prompts],
        )


@dataclass
class RolloutBatch:
    prompt_ids: torch.Tensor  # [N, P] left-padded prompt tokens
    prompt_mask: torch.Tensor  # [N, P] 1 = real token
    completion_ids: torch.Tensor  # [N, Lc] the final canvas (EOS-filled after the first EOS)
    completion_mask: torch.Tensor  # [N, Lc] 1 up to and including the first EOS
    completions: list[str]  # decoded completions (text up to the first EOS)
    trace: Trace  # every decision of the sampler
    stats: dict = field(default_factory=dict)  # forwards, tokens forwarded, seconds
    rewards: torch.Tensor | None = None  # [N]
    advantages: torch.Tensor | None = None  # [N]
    plan: PlanBatch | None = None  # hybrid rollouts: the planner's plan behind each row (rollout/hybrid.py)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], 1)  # [N, P + Lc]

    @property
    def attention_mask(self) -> torch.Tensor:
        # completion positions are all attendable (EOS padding is part of the canvas the model saw)
        return torch.cat([self.prompt_mask, torch.ones_like(self.completion_ids)], 1)  # [N, P + Lc]

    def select(self, rows: torch.Tensor) -> "RolloutBatch":
        """Rows `rows` of the batch (micro-batching); tensors and lists alike."""
        idx = rows.tolist()
        pick = lambda t: None if t is None else t[rows.to(t.device)]
        return replace(
            self,
            prompt_ids=pick(self.prompt_ids),
            prompt_mask=pick(self.prompt_mask),
            completion_ids=pick(self.completion_ids),
            completion_mask=pick(self.completion_mask),
            completions=[self.completions[i] for i in idx],
            trace=self.trace.select(rows),
            rewards=pick(self.rewards),
            advantages=pick(self.advantages),
            plan=None if self.plan is None else self.plan.select(rows),
        )

    def __len__(self) -> int:
        return len(self.completions)

    @staticmethod
    def concat(parts: list["RolloutBatch"]) -> "RolloutBatch":
        """Batches as one, rows in order; prompts re-padded on the left to the longest (values under
        prompt_mask 0 are never read). Rewards, advantages and stats are not carried; plans are."""
        P = max(b.prompt_ids.shape[1] for b in parts)

        def left(t):  # [n, p] -> [n, P]
            return torch.nn.functional.pad(t, (P - t.shape[1], 0))

        return RolloutBatch(
            torch.cat([left(b.prompt_ids) for b in parts]),
            torch.cat([left(b.prompt_mask) for b in parts]),
            torch.cat([b.completion_ids for b in parts]),
            torch.cat([b.completion_mask for b in parts]),
            [c for b in parts for c in b.completions],
            Trace.concat([b.trace for b in parts]),
            plan=PlanBatch.concat([b.plan for b in parts]) if parts[0].plan is not None else None,
        )

    def to(self, device) -> "RolloutBatch":
        mv = lambda t: None if t is None else t.to(device)
        return replace(
            self,
            prompt_ids=mv(self.prompt_ids),
            prompt_mask=mv(self.prompt_mask),
            completion_ids=mv(self.completion_ids),
            completion_mask=mv(self.completion_mask),
            rewards=mv(self.rewards),
            advantages=mv(self.advantages),
            plan=None if self.plan is None else self.plan.to(device),
        )
