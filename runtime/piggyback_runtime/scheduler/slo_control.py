"""SLO control (OmniServe §3.4): how much BE work joins each iteration, and which LS requests to admit.

Pure Python with no torch import: the simulator drives this same code with the same latency model.

Per iteration (`SLOController.choose`), in priority order LS decode > LS chunked prefill > BE chunked prefill
> BE decode: LS work is taken as the engine planned it, then a binary search finds the most BE prefill
tokens, then the most BE decode rows per layer, whose predicted iteration latency stays within

    target = min(tightest TPOT budget of decoding LS requests, TTFT budget of queued LS prefills) × (1 − margin)

TTFT budget rule. LS prefills are served first-come first-served, `ls_chunk_tokens` prompt tokens per
iteration. A queued LS request i with deadline D_i (arrival + its TTFT SLO) gets its first token at the end
of iteration n_i = ceil(P_≤i / ls_chunk_tokens), where P_≤i is its own remaining prompt plus that of every LS
prefill ahead of it. Assuming the next iterations look like this one, it meets its deadline when
n_i × latency ≤ D_i − now, so its budget is (D_i − now) / n_i; the TTFT budget is the smallest of these.
A request already past its deadline is a miss whatever happens: it is left out rather than starving BE.

Closed loop. Every prediction the controller makes (BE allowance, admission, headroom) is the latency model's
times `OnlineCorrection.factor` for the iteration's regime, and the engine reports each iteration's measured
time (`observe`): when iterations run slower than the profile says, the factor rises and fewer BE rows and
tokens fit; when they return to the profile, it settles back.

Cost: gathering the budgets is one pass over the LS states (O(n)); the searches are O(log max) latency
predictions each, with no per-request work inside them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from piggyback_runtime.scheduler.latency_model import (
    IterationShape,
    LatencyModel,
    OnlineCorrection,
    prefill_chunk_load,
    regime_of,
)

# Predictions equal to a budget up to float rounding count as meeting it ("exactly at the SLO" is admitted).
_REL_EPS = 1e-9

REASON_TTFT = "TTFTUnattainable"
REASON_TPOT = "TPOTUnattainable"
REASON_ADMITTED = "Admitted"


@dataclass(frozen=True)
class LSRequestState:
    """One LS request the engine holds (running or queued), as the controller needs it."""

    tpot_s: float  # the request's TPOT SLO
    ttft_deadline_s: float | None  # arrival + TTFT SLO while no token was produced yet; None afterwards
    remaining_prefill_tokens: int  # prompt tokens not yet in the KV cache (0 once decoding)
    context_len: int  # tokens in the KV cache; for a decode, including this iteration's token (its attention load)

    @property
    def decoding(self) -> bool:
        return self.remaining_prefill_tokens == 0


@dataclass(frozen=True)
class PrefillChunk:
    tokens: int
    load: float  # prefill_chunk_load(start, tokens)


@dataclass(frozen=True)
class IterationDemand:
    """The work on offer this iteration, already ordered by priority by the engine's planner."""

    ls_decode_rows: int = 0
    ls_decode_attention_load: float = 0.0  # sum of the LS decodes' context lengths
    ls_prefill_chunks: Sequence[PrefillChunk] = ()  # LS chunks the token budget already holds
    be_prefill_tokens_available: int = 0  # BE prompt tokens that could be prefilled now (token budget left)
    be_prefill_context_start: int = 0  # tokens already cached for the BE request chunked next (load estimate)
    be_decode_rows_ready: int = 0  # BE rows one layer could take now (CPU attention results ready)
    ls_decode_longest_context: int = 0  # the longest of them (a padded decode kernel pays it for every row)
    token_budget: int = 0  # this iteration's token budget (the TTFT budget's prefill rate); 0: ls_chunk_tokens
    sub_batches: int = 1  # 2: an iteration that prefills runs as two sub-batches (the planner's split rule)

    @property
    def ls_prefill_tokens(self) -> int:
        return sum(c.tokens for c in self.ls_prefill_chunks)

    @property
    def ls_prefill_load(self) -> float:
        return sum(c.load for c in self.ls_prefill_chunks)


@dataclass(frozen=True)
class BEAllowance:
    be_rows_per_layer: int  # at most this many BE rows join each layer's Dense batch
    be_prefill_tokens: int  # BE prompt tokens to prefill on the accelerator this iteration
    predicted_latency_s: float  # the model's latency for LS work + this allowance
    budget_s: float = math.inf  # the latency target it was fitted under (inf: no LS constraint)
    binding: str = "none"  # which SLO set the budget: "tpot", "ttft" or "none"


@dataclass(frozen=True)
class NewLSRequest:
    prompt_tokens: int
    ttft_s: float  # TTFT SLO
    tpot_s: float  # TPOT SLO
    arrival_s: float


@dataclass(frozen=True)
class AdmissionDecision:
    admitted: bool
    reason: str  # CamelCase: Admitted, TTFTUnattainable, TPOTUnattainable
    message: str
    retry_after_s: float = 0.0  # a hint for Retry-After (whole seconds, ≥ 1 when rejected)
    predicted_ttft_s: float = 0.0
    predicted_iteration_s: float = 0.0


@dataclass(frozen=True)
class LSArrivalPrediction:
    """What a new LS request meets (`SLOController.predict_ls_arrival`)."""

    iterations: int  # iterations until its prompt is prefilled (FCFS behind the LS prompts queued ahead)
    prefill_iteration_s: float  # each of them: the LS decodes plus a full prefill chunk
    decode_iteration_s: float  # an iteration once it decodes too
    prefill_tokens_per_iteration: int  # LS prompt tokens an iteration takes (the budget decode rows leave)

    @property
    def ttft_s(self) -> float:
        """Its time to first token from now (the time it already waited not included)."""
        return self.iterations * self.prefill_iteration_s


@dataclass(frozen=True)
class LSMix:
    """The current LS request mix, from recently finished LS requests (for headroom)."""

    avg_prompt_tokens: float
    avg_output_tokens: float
    tpot_s: float  # tightest TPOT SLO among the LS services
    ttft_s: float  # tightest TTFT SLO among the LS services


@dataclass
class _Budgets:
    tpot_s: float = math.inf
    ttft_s: float = math.inf
    queued_prefill_tokens: int = 0  # remaining LS prompt tokens, running and queued
    queued_requests: int = 0  # LS requests still prefilling: each decodes next to a new arrival soon
    queued_context: float = 0.0  # their contexts once they decode (prompt + first token)
    queued_longest: int = 0
    decode_rows: int = 0
    decode_longest: int = 0  # longest LS decode context
    decode_load: float = 0.0

    @property
    def target_s(self) -> float:
        return min(self.tpot_s, self.ttft_s)

    @property
    def binding(self) -> str:
        if self.target_s == math.inf:
            return "none"
        return "tpot" if self.tpot_s <= self.ttft_s else "ttft"


@dataclass
class SLOController:
    latency_model: LatencyModel
    safety_margin: float = 0.1  # the planner keeps predicted latency this share below the budget
    ls_chunk_tokens: int = 512  # LS prefill tokens per iteration (the engine's token budget)
    max_be_rows_per_layer: int = 1024
    max_be_prefill_tokens: int = 512
    admission_margin: float = 0.0  # admission compares predictions to the SLO itself by default
    # The planner sizes each iteration's token budget to the decoding LS requests' TPOT (engine.slo_token_budget;
    # ls_chunk_tokens is then its upper bound, min_token_budget its floor): admission predicts with that budget.
    slo_token_budget: bool = False
    min_token_budget: int = 1
    # BE decode rows before BE prefill (hybrid placement): a ready host-resident row holds its KV already and gives a
    # token for one Dense row, a prompt token only 1/p of one later; rows left unmerged hold host KV and give none.
    be_rows_first: bool = False
    # The mean output length of recent LS requests (the planner keeps it; inf until one finished): how long a
    # queued LS request decodes once prefilled (`predict_ls_arrival`).
    ls_output_tokens: float = math.inf
    # Measured ÷ predicted per regime, fed by observe(); a fresh one (factor 1) until iterations are reported.
    correction: OnlineCorrection = field(default_factory=OnlineCorrection)
    _last: BEAllowance | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.safety_margin < 1 or not 0 <= self.admission_margin < 1:
            raise ValueError("safety_margin and admission_margin must be in [0, 1)")
        if self.ls_chunk_tokens < 1:
            raise ValueError("ls_chunk_tokens must be at least 1")

    # --- the closed-loop prediction ------------------------------------------------------------------------
    def predict_parts(self, dense_rows: float, prefill_load: float, decode_load: float, logit_rows: float = 0.0,
                      be_rows_per_layer: float = 0.0, sub_batches: int = 1) -> float:  # fmt: skip
        """The latency model's prediction corrected by what iterations of this regime measured lately."""
        raw = self.latency_model.predict_parts(dense_rows, prefill_load, decode_load, logit_rows, be_rows_per_layer,
                                               sub_batches)  # fmt: skip
        return raw * self.correction.factor(regime_of(prefill_load, be_rows_per_layer, decode_load))

    def predict(self, shape: IterationShape) -> float:
        return self.predict_parts(shape.dense_rows, shape.prefill_attention_load, shape.decode_attention_load,
                                  shape.logit_rows, shape.be_rows_per_layer, shape.sub_batches)  # fmt: skip

    def observe(self, shape: IterationShape, measured_s: float) -> float:
        """An iteration of `shape` took `measured_s`: returns what the controller had predicted for it (the
        corrected prediction, for the error metric), then updates the correction with the profile's own."""
        regime = regime_of(shape.prefill_attention_load, shape.be_rows_per_layer, shape.decode_attention_load)
        raw = self.latency_model.predict(shape)
        predicted = raw * self.correction.factor(regime)
        self.correction.observe(regime, raw, measured_s)
        return predicted

    # --- budgets ------------------------------------------------------------------------------------------
    def _budgets(self, ls_state: Sequence[LSRequestState], now_s: float, chunk: int = 0) -> _Budgets:
        """One pass over the LS requests (in FCFS order): tightest TPOT and TTFT budgets (module docstring);
        `chunk`: the LS prompt tokens an iteration prefills (0: ls_chunk_tokens)."""
        b = _Budgets()
        chunk = chunk or self.ls_chunk_tokens
        cumulative = 0
        for s in ls_state:
            if s.remaining_prefill_tokens == 0:
                b.decode_rows += 1
                b.decode_load += s.context_len
                b.decode_longest = max(b.decode_longest, s.context_len)
                if s.tpot_s < b.tpot_s:
                    b.tpot_s = s.tpot_s
                continue
            cumulative += s.remaining_prefill_tokens
            b.queued_requests += 1
            b.queued_context += s.context_len + 1
            b.queued_longest = max(b.queued_longest, s.context_len + 1)
            if s.ttft_deadline_s is None:
                continue
            slack = s.ttft_deadline_s - now_s
            if slack <= 0:
                continue  # already a miss; holding BE back cannot save it
            budget = slack / -(-cumulative // chunk)
            if budget < b.ttft_s:
                b.ttft_s = budget
        b.queued_prefill_tokens = cumulative
        return b

    # --- the per-iteration decision -----------------------------------------------------------------------
    def choose(self, demand: IterationDemand, ls_state: Sequence[LSRequestState], now_s: float) -> BEAllowance:
        """The largest BE allowance (BE prefill first, then BE decode rows) whose predicted latency fits."""
        budgets = self._budgets(ls_state, now_s, demand.token_budget)
        model = self.predict_parts
        sub_batches_of = self.latency_model.sub_batches_of
        ls_rows = demand.ls_decode_rows + demand.ls_prefill_tokens
        prefill_load = demand.ls_prefill_load
        decode_load = self.latency_model.decode_load(demand.ls_decode_rows, demand.ls_decode_attention_load,
                                                     demand.ls_decode_longest_context)  # fmt: skip
        max_prefill = max(0, min(demand.be_prefill_tokens_available, self.max_be_prefill_tokens))
        max_rows = max(0, min(demand.be_decode_rows_ready, self.max_be_rows_per_layer))
        start = demand.be_prefill_context_start
        # Rows that sample a token (final norm + lm_head): every LS decode and chunk, the BE prefill chunk, and
        # as many BE rows as one layer admits (they may all be at the last layer).
        ls_logits = demand.ls_decode_rows + len(demand.ls_prefill_chunks)

        target = budgets.target_s
        if target == math.inf and ls_rows == 0:
            # No LS work and no LS deadline: BE takes everything that is ready.
            predicted = model(
                max_prefill + max_rows,
                prefill_chunk_load(start, max_prefill) if max_prefill else 0.0,
                0.0,
                (max_prefill > 0) + max_rows,
                max_rows,
                sub_batches_of(max_prefill + max_rows, max_prefill > 0, demand.sub_batches),
            )
            allowance = BEAllowance(max_rows, max_prefill, predicted)
            self._last = allowance
            return allowance
        limit = target * (1 - self.safety_margin) * (1 + _REL_EPS)

        def predicted_s(prefill_tokens: int, rows: int) -> float:
            """The iteration with this BE prefill chunk and this many BE rows per layer next to the LS work."""
            load = prefill_load + (prefill_chunk_load(start, prefill_tokens) if prefill_tokens else 0.0)
            dense_rows = ls_rows + prefill_tokens + rows
            split = sub_batches_of(dense_rows, bool(prefill_tokens or demand.ls_prefill_chunks), demand.sub_batches)
            return model(dense_rows, load, decode_load, ls_logits + (prefill_tokens > 0) + rows, rows, split)

        # The host-path policies fit ready BE rows before BE prefill (be_rows_first); otherwise prefill goes first.
        first_rows = largest_fitting(lambda r: predicted_s(0, r) <= limit, max_rows) if self.be_rows_first else 0
        prefill = largest_fitting(lambda t: predicted_s(t, first_rows) <= limit, max_prefill)
        rows = largest_fitting(lambda r: predicted_s(prefill, r) <= limit, max_rows)
        predicted = predicted_s(prefill, rows)
        allowance = BEAllowance(rows, prefill, predicted, target, budgets.binding)
        self._last = allowance
        return allowance

    @property
    def last_allowance(self) -> BEAllowance | None:
        return self._last

    # --- admission ----------------------------------------------------------------------------------------
    def predict_ls_arrival(self, decode_rows: float, decode_context: float, decode_longest: float,
                           queued_prefill_tokens: float, prompt_tokens: float, queued_requests: float = 0.0,
                           queued_context: float = 0.0, queued_longest: float = 0.0,
                           decode_tpot_s: float = math.inf,
                           ls_output_tokens: float = math.inf) -> LSArrivalPrediction:  # fmt: skip
        """What a new LS request of `prompt_tokens` meets when it joins LS work of `decode_rows` decodes (their
        contexts summing to `decode_context`, the longest `decode_longest`) and `queued_prefill_tokens` LS
        prompt tokens of `queued_requests` requests queued ahead of it (their contexts once they decode
        summing to `queued_context`, the longest `queued_longest`). The one prediction admission (`admit_ls`)
        and the headroom gauge (`headroom_rps`) both decide with, so that they cannot disagree; every latency in it is
        `predict_parts`, the closed-loop corrected model the BE allowance uses too.

        - TTFT: it queues behind every LS prefill already held (FCFS). Decode rows take the token budget first
          (LS decode > LS prefill), so each iteration prefills chunk − decode rows of the queue, next to the
          decodes: n = ceil((queued + its prompt) / that) iterations, each costing latency(decode rows + a
          full chunk). The chunk's attention load is that of the new prompt's last chunk, the heaviest of it.
          With the SLO-sized token budget (`slo_token_budget`), "chunk" is the budget the planner will use
          while decodes of TPOT `decode_tpot_s` run: the largest chunk (that heaviest one) whose iteration
          predicts within that TPOT less the safety margin (`largest_ls_chunk`), never below the budget's floor.
        - TPOT: while it prefills, iterations hold the decodes plus that chunk; once it decodes, one more decode
          row with its prompt as context.
        - Queueing: the requests queued ahead prefill first (FCFS), so by the time its last chunk runs they
          decode too: its prefill iteration and its decode iterations hold their rows as well as today's decodes.
          Without them a burst of arrivals was admitted one by one against the same few decode rows, and then
          decoded together in iterations far longer than any one admission had predicted. But a request decodes
          for only about `ls_output_tokens` iterations (the mean LS output) once prefilled, and the queue
          prefills at most (chunk − decode rows) ÷ (its mean prompt) requests an iteration: of those queued
          ahead, at most that many × `ls_output_tokens` still decode next to its last chunk (the rest are done).
          Counting every one of a long queue made each admission, and the gauge, assume iterations far slower
          than they run, and refuse rate the engine had room for.
        """
        model = self.predict_parts
        decode_load = self.latency_model.decode_load
        upper = max(1, math.ceil(self.ls_chunk_tokens - decode_rows))
        still_decoding = queued_requests
        if queued_requests > 0 and ls_output_tokens < math.inf:
            prefilled_per_iteration = upper / max(1.0, queued_prefill_tokens / queued_requests)
            still_decoding = min(queued_requests, prefilled_per_iteration * ls_output_tokens)
        rows = decode_rows + still_decoding  # decoding by the time its own prompt runs
        share = still_decoding / queued_requests if queued_requests > 0 else 0.0
        context, longest = decode_context + queued_context * share, max(decode_longest, queued_longest)
        rows_load = decode_load(rows, context, longest)
        queued = queued_prefill_tokens + prompt_tokens
        per_iteration = float(upper)
        if self.slo_token_budget and decode_tpot_s < math.inf:
            floor = max(1, math.ceil(self.min_token_budget - decode_rows))
            fitted = self.largest_ls_chunk(rows, rows_load, decode_tpot_s * (1 - self.safety_margin),
                                           min(upper, math.ceil(queued)),
                                           lambda c: prefill_chunk_load(max(0.0, prompt_tokens - c), c))  # fmt: skip
            per_iteration = float(min(upper, max(floor, fitted)))
        chunk_tokens = min(per_iteration, queued)
        chunk_start = max(0.0, prompt_tokens - chunk_tokens)
        prefill_iteration = model(rows + chunk_tokens, prefill_chunk_load(chunk_start, chunk_tokens),
                                  rows_load, rows + 1)  # fmt: skip
        own_context = prompt_tokens + 1
        own_decode_load = decode_load(rows + 1, context + own_context, max(longest, own_context))
        decode_iteration = model(rows + 1, 0.0, own_decode_load, rows + 1)
        return LSArrivalPrediction(math.ceil(queued / per_iteration), prefill_iteration, decode_iteration,
                                   int(per_iteration))  # fmt: skip

    def largest_ls_chunk(self, decode_rows: float, decode_load: float, limit_s: float, upper: int,
                         chunk_load: Callable[[int], float]) -> int:
        """The most LS prefill tokens (≤ `upper`; attention load `chunk_load(tokens)`) whose iteration next to
        `decode_rows` decodes of attention load `decode_load` predicts within `limit_s`: the SLO-sized token
        budget less the decode rows, as the planner sizes it and admission predicts it. 0 when none fits."""

        def fits(tokens: int) -> bool:
            return self.predict_parts(decode_rows + tokens, chunk_load(tokens), decode_load, decode_rows + 1) <= limit_s

        return largest_fitting(fits, upper)

    def admit_ls(
        self,
        new_request: NewLSRequest,
        running_ls: Sequence[LSRequestState],
        demand: IterationDemand,
        now_s: float,
    ) -> AdmissionDecision:
        """Admit a new LS request only if `predict_ls_arrival` says it meets its TTFT and, with it added, every
        decoding LS request (and then itself) still meets its TPOT. BE is left out of these predictions: the
        planner shrinks BE to zero before LS misses. Edges: a prediction exactly at the SLO is admitted.
        predicted TTFT = (now − arrival) + n × latency(decode rows, a chunk) (see `predict_ls_arrival`)."""
        budgets = self._budgets(running_ls, now_s)
        scale = (1 - self.admission_margin) * (1 + _REL_EPS)
        chunk = self.ls_chunk_tokens
        decoding = budgets.decode_rows
        rows = decoding + budgets.queued_requests  # LS decode rows next to its prompt's last chunk (queued decode too)
        arrival = self.predict_ls_arrival(decoding, budgets.decode_load, budgets.decode_longest,
                                          budgets.queued_prefill_tokens, new_request.prompt_tokens,
                                          budgets.queued_requests, budgets.queued_context,
                                          budgets.queued_longest, decode_tpot_s=budgets.tpot_s,
                                          ls_output_tokens=self.ls_output_tokens)  # fmt: skip
        prefill_iteration, decode_iteration = arrival.prefill_iteration_s, arrival.decode_iteration_s
        iterations = arrival.iterations
        waited = max(0.0, now_s - new_request.arrival_s)
        ttft = waited + arrival.ttft_s
        tpot_budget = min(budgets.tpot_s, new_request.tpot_s)
        worst_iteration = max(prefill_iteration, decode_iteration)

        def reject(reason: str, message: str) -> AdmissionDecision:
            # Retry once the LS prefill queue ahead has drained (whole seconds, for Retry-After).
            drain = (budgets.queued_prefill_tokens / arrival.prefill_tokens_per_iteration) * prefill_iteration
            return AdmissionDecision(False, reason, message, float(max(1, math.ceil(drain))), ttft, worst_iteration)

        if ttft > new_request.ttft_s * scale:
            # The parts are rounded first and the total is their sum, so the numbers shown add up exactly.
            waited_t, iteration_t = _tenths_ms(waited), _tenths_ms(prefill_iteration)
            total_t = waited_t + iterations * iteration_t
            return reject(
                REASON_TTFT,
                f"predicted TTFT {_ms(total_t)} ms = waited {_ms(waited_t)} ms + {iterations} iterations × "
                f"{_ms(iteration_t)} ms exceeds {self._limit_text('TTFT', new_request.ttft_s)} "
                f"({budgets.queued_prefill_tokens} LS prompt tokens queued ahead + {new_request.prompt_tokens} of "
                f"its own, {arrival.prefill_tokens_per_iteration} per iteration next to {decoding} LS decode rows); "
                "retry later",
            )
        # The TPOT of running decodes is held during its prefill; its own and theirs once it decodes.
        if prefill_iteration > budgets.tpot_s * scale:
            return reject(
                REASON_TPOT,
                f"while it prefills, a predicted iteration of {_ms(_tenths_ms(prefill_iteration))} ms ({rows} LS "
                f"decode rows + a prefill chunk of up to {min(chunk, arrival.prefill_tokens_per_iteration)} tokens) "
                f"exceeds {self._limit_text('TPOT', budgets.tpot_s)} of the {decoding} decoding LS requests; "
                "retry later",
            )
        if decode_iteration > tpot_budget * scale:
            return reject(
                REASON_TPOT,
                f"once it decodes, a predicted iteration of {_ms(_tenths_ms(decode_iteration))} ms ({rows + 1} LS "
                f"decode rows) exceeds {self._limit_text('TPOT', tpot_budget)} (the tightest of its own and "
                f"{decoding} decoding LS requests'); retry later",
            )
        return AdmissionDecision(True, REASON_ADMITTED, "admitted", 0.0, ttft, worst_iteration)

    def _limit_text(self, kind: str, slo_s: float) -> str:
        """The bound a prediction was compared with, as the message shows it (the SLO less any margin)."""
        slo_t = _tenths_ms(slo_s)
        if not self.admission_margin:
            return f"the {kind} SLO {_ms(slo_t)} ms"
        bound_t = _tenths_ms(slo_s * (1 - self.admission_margin))
        margin = f"{self.admission_margin:.0%}"
        return f"{_ms(bound_t)} ms (the {kind} SLO {_ms(slo_t)} ms less the {margin} admission margin)"

    # --- capacity ----------------------------------------------------------------------------------------
    def sustainable_ls_rps(self, mix: LSMix, max_rps: float = 1e4) -> float:
        """The largest Poisson arrival rate λ of mix requests (prompt P, output O) at which a new arrival, meeting
        the queue that rate produces, is still admitted: `predict_ls_arrival`, the very prediction `admit_ls`
        decides with, says it meets its TTFT and every TPOT, against the same SLOs and margin. 0 if none is.

        The state λ produces, for iterations of T seconds carrying C LS prompt tokens each (the token budget
        the decode rows leave; both as `predict_ls_arrival` computes them for that state):
          - decode rows R = λ·O·T (Little's law: each LS request decodes for about O iterations);
          - prefill is a single server taking C tokens per iteration, so a request's service is P/C
            iterations and its utilisation ρ = λ·P·T / C; ρ ≥ 1: the queue grows without bound, λ does not fit;
          - the queue a Poisson arrival meets (PASTA: the time-average one): with service times this near
            constant, the Pollaczek–Khinchine mean wait of M/D/1, W = ρ·s / (2(1 − ρ)) with s = P·T/C, which
            is W·C/T = P·ρ / (2(1 − ρ)) prompt tokens queued ahead of it, of P·ρ / (2(1 − ρ)) / P requests.
            (Queueing only one iteration's arrivals, λ·P·T tokens, ignores that Poisson bursts pile up as ρ
            nears 1: the gauge then promised rates admission refused.)
        T, R and C depend on one another: they are iterated from T = one decode iteration until they settle
        (each grows with the others, so the iteration climbs to the smallest fixed point, or past the TPOT).
        The predicate is monotone in λ; the largest λ is found by bisection.
        """
        scale = (1 - self.admission_margin) * (1 + _REL_EPS)
        tpot_limit = mix.tpot_s * scale
        prompt, output = max(1.0, mix.avg_prompt_tokens), max(1.0, mix.avg_output_tokens)
        context = prompt + output / 2  # a decode row's mean context over its decode

        def fits(rate: float) -> bool:
            iteration = self.predict_parts(1, 0.0, self.latency_model.decode_load(1, context, context), 1)
            arrival: LSArrivalPrediction | None = None
            for _ in range(100):
                rows = rate * output * iteration
                tokens_per_iteration = arrival.prefill_tokens_per_iteration if arrival else self.ls_chunk_tokens
                utilisation = rate * prompt * iteration / max(1, tokens_per_iteration)
                if utilisation >= 1 or rows >= self.ls_chunk_tokens:
                    return False
                queued_requests = utilisation / (2 * (1 - utilisation))
                arrival = self.predict_ls_arrival(rows, rows * context, context, queued_requests * prompt, prompt,
                                                  queued_requests, queued_requests * (prompt + 1), prompt + 1,
                                                  decode_tpot_s=mix.tpot_s if rows > 0 else math.inf,
                                                  ls_output_tokens=output)  # fmt: skip
                if arrival.prefill_iteration_s > tpot_limit or arrival.decode_iteration_s > tpot_limit:
                    return False
                if arrival.prefill_iteration_s <= iteration * (1 + 1e-6):
                    break
                iteration = arrival.prefill_iteration_s
            assert arrival is not None
            return arrival.ttft_s <= mix.ttft_s * scale

        if not fits(0.0):
            return 0.0
        lo, hi = 0.0, max_rps
        if fits(hi):
            return hi
        for _ in range(60):
            mid = (lo + hi) / 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
            if hi - lo <= 1e-4 * max(1.0, lo):
                break
        return lo

    def headroom_rps(self, ls_state: Sequence[LSRequestState], mix: LSMix, now_s: float,
                     admitted_rps: float = 0.0) -> float:  # fmt: skip
        """Predicted extra LS request rate (requests/s) admission would still let in: the rate the mix
        sustains (`sustainable_ls_rps`) less the LS rate admitted lately (`admitted_rps`), never below 0; and
        0 while admission would refuse a mix request arriving now (`admit_ls` on the LS work held now).

        So gauge + the rate admitted = the LS rate that fits, and under overload, where admission holds the
        queue at its limit and lets the sustainable rate through, the gauge reads about 0."""
        probe = NewLSRequest(max(1, round(mix.avg_prompt_tokens)), mix.ttft_s, mix.tpot_s, now_s)
        if not self.admit_ls(probe, ls_state, IterationDemand(), now_s).admitted:
            return 0.0
        return max(0.0, self.sustainable_ls_rps(mix) - admitted_rps)


def largest_fitting(fits: Callable[[int], bool], upper: int) -> int:
    """Largest k in [0, upper] with fits(k), for a predicate true up to some k and false beyond; 0 if none."""
    if upper <= 0 or not fits(1):
        return 0
    if fits(upper):
        return upper
    lo, hi = 1, upper  # fits(lo) and not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def _tenths_ms(seconds: float) -> int:
    """Seconds as a whole number of 0.1 ms: sums of these are exact, unlike sums of rounded floats."""
    return round(seconds * 10_000)


def _ms(tenths: int) -> str:
    return f"{tenths // 10}.{tenths % 10}"
