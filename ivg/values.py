"""The roles a search talks to: the base policy and the two value functions.

Each role serves *sessions* (one per search over a batch of prompts) with the messages of
ivg/protocol.py, so the search runs unchanged on models in-process or behind Ray actors
(pipeline/ wraps these). `handle(message)` answers any of them:

  Open / Select / Close   prefill each model's own view of the prompts; fork / reorder / drop rows;
                          report the tokens each owner cost
  Step (value roles)      feed the newest tokens; the value vector over the vocab per row:
                            implicit: log pi_t - log pi_u; explicit: Q(s, .)
  Sample (the base)       feed the newest tokens; z = logits + beta * value; warp; sample one token
                          per row from the uniform the search drew for it; return it and v(s, token)
  Chunk (chunk scorers)   feed a chunk; each row's value of its whole response so far:
                            implicit: sum of log pi_t - log pi_u over the response tokens;
                            explicit: Q of the last token, or a sequence classifier's score
  StepAt (value roles)    feed the newest tokens; each row's value at one token (EOS, for score_eos)
  Check / Cut / Room      per prompt, why it cannot run / how many characters to cut to fit /
                          how many tokens its context leaves (max_new_tokens: auto)

One class per value function: BaseRole, ImplicitRole, and for the explicit value TokenRewardRole,
CausalClassifierRole (fed incrementally) and EncoderClassifierRole (a bidirectional classifier that
reads the whole text each chunk); `load_role` picks one. The formulas are ivg/guidance.py's.
A role whose tokenizer differs from the base's scores the decoded `texts` (re-tokenized; only the
changed tail is encoded again); a role sharing it takes the new token ids directly.
"""

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from ivg.cache import cache_kwargs
from ivg.guidance import TokenGuidance, explicit_value, implicit_value, upcast
from ivg.models import LoadedModel, pad_id, prompt_ids, same_vocab
from ivg.protocol import (Check, Chunk, Close, Closed, Cut, Cuts, Open, Opened, Problems, Room, Rooms, Sample, Sampled,
                          Sampling, Scores, Select, Step, StepAt)
from ivg.sampling import sample, warpers
from ivg.stream import Stream


def lm_forward(model):
    def forward(ids, mask, pos, cache, keep_all):
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                     logits_to_keep=0 if keep_all else 1, **cache_kwargs(model, cache)).logits
    return forward


def body_forward(model):
    """A causal model's body (a sequence classifier's, a token reward model's): hidden states, for the
    role to apply the head where it needs it."""
    body = model.base_model

    def forward(ids, mask, pos, cache, keep_all):
        hidden = body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                      **cache_kwargs(body, cache)).last_hidden_state
        return hidden if keep_all else hidden[:, -1:]
    return forward


def new_token_scores(prev_last: torch.Tensor, out: torch.Tensor, new: list[list[int]]) -> list[list[float]]:
    """Per row, each new token's entry in the prediction made just before it.

    prev_last (B, V) predicts each row's first new token; out (B, T, V) are the left-padded block's
    outputs, so out[:, j] predicts the token in column j + 1."""
    B, T = out.shape[:2]
    # lists in, lists out, one tensor each way: per-row tensor indexing dominates with many rows
    block = torch.tensor([[0] * (T - len(n)) + list(n) for n in new], dtype=torch.long, device=out.device)
    inner = out[:, :-1].gather(-1, block[:, 1:, None]).squeeze(-1).double().cpu().tolist()  # (B, T-1)
    first = prev_last.gather(-1, block[torch.arange(B), [T - max(len(n), 1) for n in new]][:, None])
    first = first.squeeze(-1).double().cpu().tolist()  # (B,)
    return [[first[i]] + inner[i][T - len(n):] if n else [] for i, n in enumerate(new)]


@dataclass
class Session:
    """One search's state in a role: a Stream per model, and per row its prompt length and whatever
    the role keeps per row (the implicit role: each response token's log-ratio; explicit: the score)."""

    streams: list[Stream]  # one per model of the role
    prompt_len: list[int]  # per row: tokens of the role's own prompt view
    state: list  # per row: the role's own value, reordered with the rows
    sampling: Sampling | None = None  # the base: how its logits become tokens
    warp: object = None  # the base: the warpers of sampling.decode, built once

    def select(self, rows: list[int]) -> None:
        for s in self.streams:
            s.select(rows)
        self.prompt_len = [self.prompt_len[r] for r in rows]
        self.state = [self.state[r] for r in rows]

    def tokens(self) -> Counter:
        return sum((s.tokens for s in self.streams), Counter())


class Role:
    """Sessions of Streams over one or two models that share a tokenizer."""

    initial_state = None  # each row's state when a session opens

    def __init__(self, models: list[LoadedModel], base_tokenizer):
        self.models = models
        self.tokenizer = models[0].tokenizer
        self.shares_base_vocab = same_vocab(self.tokenizer, base_tokenizer)
        self.sessions: dict = {}

    def handle(self, message, value=None):
        """Answer one message of ivg/protocol.py (`value`: the v(s, .) a Sample combines)."""
        if isinstance(message, Sample):
            return self.sample(message, value)
        verb = {Open: self.open, Select: self.select, Step: self.step, StepAt: self.step_at, Chunk: self.chunk,
                Check: self.check, Cut: self.cut, Room: self.room, Close: self.close}.get(type(message))
        if verb is None:
            raise TypeError(f"{type(self).__name__} does not answer {type(message).__name__}")
        return verb(message)

    def forward_of(self, loaded: LoadedModel):
        return lm_forward(loaded.model)

    def open(self, m: Open) -> Opened:
        streams = []
        for loaded in self.models:
            stream = Stream(self.forward_of(loaded), pad_id(loaded.tokenizer), loaded.device, list(m.owners))
            stream.extend([prompt_ids(loaded, p) for p in m.prompts])
            streams.append(stream)
        self.sessions[m.sid] = Session(streams, streams[0].count.tolist(), [self.initial_state] * len(m.prompts),
                                       m.sampling, m.sampling and warpers(m.sampling.decode))
        return Opened(needs_text=not self.shares_base_vocab)

    def select(self, m: Select) -> None:
        self.sessions[m.sid].select(m.rows)

    def step(self, m: Step) -> torch.Tensor:
        """Feed the newest tokens; returns v(s, .) (rows, V) of a token-wise value role."""
        tokens = torch.tensor(m.tokens, dtype=torch.long)
        session = self.sessions[m.sid]
        for stream in session.streams:
            stream.step(tokens)
        return self.value(session)

    def step_at(self, m: StepAt) -> Scores:
        """Feed the newest tokens; each row's value at token `m.at` (of the vector `step` returns)."""
        value = self.step(Step(m.sid, m.tokens))
        return Scores(value[:, m.at].double().cpu().numpy())

    def value(self, session: "Session") -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} has no token-wise value")

    def sample(self, m: Sample, value) -> Sampled:
        raise TypeError(f"{type(self).__name__} does not sample: only the base does")

    def chunk(self, m: Chunk) -> Scores:
        raise TypeError(f"{type(self).__name__} has no chunk-level value")

    def check(self, m: Check) -> Problems:
        """Per prompt, why this role cannot take it (None if it can): empty, or too long."""
        errors = []
        for p in m.prompts:
            try:
                errors.append(self.overflow(p, m.max_new_tokens))
            except ValueError as e:
                errors.append(str(e))
        return Problems(tuple(errors))

    def cut(self, m: Cut) -> Cuts:
        """Per prompt, the fewest characters to cut from its start so that every model's view fits its
        context with max_new_tokens to spare (0: it fits). A binary search, as tokens grow with text;
        a prompt that cannot fit at all gets cut whole, and `check` then says why it fails."""
        cuts = []
        for p in m.prompts:
            if self.fits(p, m.max_new_tokens):
                cuts.append(0)
                continue
            lo, hi = 0, len(p)  # p[lo:] does not fit; p[hi:] fits, or is as short as it gets
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if self.fits(p[mid:], m.max_new_tokens) else (mid, hi)
            cuts.append(hi)
        return Cuts(tuple(cuts))

    def room(self, m: Room) -> Rooms:
        """Per prompt, the tokens left in the tightest context of this role's models after their own
        view of it (max_new_tokens: auto); None if no model names a context, or the prompt is invalid
        (`check` says why)."""
        rooms = []
        for p in m.prompts:
            try:
                left = [context_length(x.model.config) - len(prompt_ids(x, p)) for x in self.models
                        if context_length(x.model.config)]
            except ValueError:
                left = []
            rooms.append(min(left, default=None))
        return Rooms(tuple(rooms))

    def fits(self, prompt: str, max_new_tokens: int) -> bool:
        try:
            return self.overflow(prompt, max_new_tokens) is None
        except ValueError:  # empty after cutting: not a length problem, `check` will say what it is
            return True

    def overflow(self, prompt: str, max_new_tokens: int) -> str | None:
        """Why `prompt` is too long for a model of this role, or None."""
        for m in self.models:
            n, limit = len(prompt_ids(m, prompt)), context_length(m.model.config)
            if limit and n + max_new_tokens > limit:
                return (f"prompt is {n} tokens; with max_new_tokens={max_new_tokens} it exceeds the context "
                        f"of {m.spec.name} ({limit} tokens); truncate: left would cut its start")
        return None

    def close(self, m: Close) -> Closed:
        return Closed(dict(self.sessions.pop(m.sid).tokens()))

    def feed_chunk(self, session: Session, new, texts, keep_all: bool):
        """Feed a chunk to every stream: new ids when sharing the base vocab, else the re-tokenized
        text. Returns, per stream, (previous last outputs, block outputs, suffix fed, re-fed)."""
        results = []
        for stream in session.streams:
            prev = stream.last
            if self.shares_base_vocab:
                out = stream.extend(new, keep_all)
                results.append((prev, out, new, [0] * len(new)))
            else:
                enc = self.tokenizer(list(texts), add_special_tokens=False).input_ids
                target = [ids[:n] + e for ids, n, e in zip(stream.ids, session.prompt_len, enc)]
                out, suffix, refed = stream.sync(target, keep_all)
                results.append((prev, out, suffix, refed))
        return results


def context_length(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return None


class BaseRole(Role):
    def sample(self, m: Sample, value: torch.Tensor | None) -> Sampled:
        """Feed the newest tokens, then sample from the base logits guided by `value` (rows, V)."""
        session = self.sessions[m.sid]
        session.streams[0].step(torch.tensor(m.tokens, dtype=torch.long))
        return self.sampled(session, m, value)

    def sampled(self, session: Session, m: Sample, value: torch.Tensor | None) -> Sampled:
        """The tokens of the rows as they are now fed (the server's merged steps feed first)."""
        logits = session.streams[0].last  # (B, V)
        uniforms = torch.tensor(m.uniforms, dtype=torch.float64)
        if value is None:
            return Sampled(sample(upcast(logits), uniforms, session.sampling.decode, session.warp).numpy(), None)
        value = torch.as_tensor(value).to(logits.device)
        tokens = sample(TokenGuidance(session.sampling.beta)(logits, value), uniforms, session.sampling.decode,
                        session.warp)
        picked = value.gather(-1, tokens[:, None]).squeeze(-1)
        return Sampled(tokens.cpu().numpy(), picked.double().cpu().numpy())


class ImplicitRole(Role):
    """Implicit value: the log-ratio of a tuned and an untuned LM (e.g. DPO-tuned vs its SFT start)."""

    initial_state = ()  # per row: each response token's log pi_t - log pi_u

    def __init__(self, tuned: LoadedModel, untuned: LoadedModel, base_tokenizer):
        if not same_vocab(tuned.tokenizer, untuned.tokenizer):
            raise ValueError("models.tuned and models.untuned must share a tokenizer: their log-ratio is per token")
        super().__init__([tuned, untuned], base_tokenizer)

    def value(self, session: Session) -> torch.Tensor:
        tuned, untuned = session.streams
        return implicit_value(tuned.last, untuned.last)  # (B, V)

    def chunk(self, m: Chunk) -> Scores:
        session = self.sessions[m.sid]
        (prev_t, out_t, suffix, refed), (prev_u, out_u, _, _) = self.feed_chunk(session, m.new, m.texts, True)
        if out_t is not None:
            lp_t = new_token_scores(torch.log_softmax(upcast(prev_t), -1), torch.log_softmax(upcast(out_t), -1), suffix)
            lp_u = new_token_scores(torch.log_softmax(upcast(prev_u), -1), torch.log_softmax(upcast(out_u), -1), suffix)
            counts = session.streams[0].count.tolist()  # valid tokens per row, the chunk included
            for i, (fed, back) in enumerate(zip(suffix, refed)):
                # a re-fed token kept its old value; the first score of a re-fed row is discarded
                kept = counts[i] - len(fed) - session.prompt_len[i] + back
                session.state[i] = session.state[i][:kept] + tuple(a - b for a, b in zip(lp_t[i][back:], lp_u[i][back:]))
        return Scores(np.array([sum(v) for v in session.state], dtype=np.float64))


class TokenRewardRole(Role):
    """Explicit value from a token reward model: Q(s, .) over the vocab; a prefix's value is Q of its
    last token, Q(s_{n-1}, a_n).

    Its stream keeps hidden states, not logits: token-wise guidance applies the head to the newest one
    (Q(s, .), what the model's own forward computes), while chunk scoring needs one entry per row, the
    dot product of the hidden state before its last token with that token's head row, so a chunk of L
    tokens costs no L x V logits."""

    initial_state = 0.0  # per row: the latest prefix value

    def forward_of(self, loaded: LoadedModel):
        return body_forward(loaded.model)

    @torch.no_grad()
    def value(self, session: Session) -> torch.Tensor:
        head = self.models[0].model.get_output_embeddings()
        return explicit_value(head(session.streams[0].last))  # (B, V)

    @torch.no_grad()
    def chunk(self, m: Chunk) -> Scores:
        session = self.sessions[m.sid]
        [(prev, out, suffix, refed)] = self.feed_chunk(session, m.new, m.texts, True)
        if out is not None:
            head = self.models[0].model.get_output_embeddings()
            lengths = torch.tensor([len(f) for f in suffix], device=out.device)
            last = torch.tensor([f[-1] if f else 0 for f in suffix], device=out.device)
            # the hidden state that predicts each row's last new token: the block's second-to-last
            # column (blocks are left-padded), or the row's previous newest state for a single token
            before = torch.where((lengths >= 2)[:, None], out[:, -2] if out.shape[1] > 1 else prev, prev)
            q = (upcast(before) * upcast(head.weight[last])).sum(-1)
            if head.bias is not None:
                q = q + head.bias[last]
            q = q.double().cpu().tolist()
            session.state = [q[i] if len(fed) > back else session.state[i]
                             for i, (fed, back) in enumerate(zip(suffix, refed))]
        return Scores(np.array(session.state, dtype=np.float64))


class CausalClassifierRole(Role):
    """Explicit value from a causal sequence classifier (GPT-2, Llama, ... heads named `score`), fed
    incrementally: the head reads the hidden state at each row's newest token."""

    def __init__(self, loaded: LoadedModel, base_tokenizer):
        super().__init__([loaded], base_tokenizer)
        self.label_weights = classifier_weights(loaded.model.config, loaded.spec.positive_label)

    def forward_of(self, loaded: LoadedModel):
        return body_forward(loaded.model)

    def chunk(self, m: Chunk) -> Scores:
        session = self.sessions[m.sid]
        self.feed_chunk(session, m.new, m.texts, False)
        return Scores(self.score(session.streams[0].last))

    @torch.no_grad()
    def score(self, hidden: torch.Tensor) -> np.ndarray:
        logits = upcast(self.models[0].model.score(hidden))  # (B, num_labels)
        return (logits @ self.label_weights.to(logits)).double().cpu().numpy()


class EncoderClassifierRole(Role):
    """Explicit value from a bidirectional classifier (BERT-like): no cache can be extended, so each
    chunk it reads the whole prompt + response of every row."""

    def __init__(self, loaded: LoadedModel, base_tokenizer):
        super().__init__([loaded], base_tokenizer)
        self.label_weights = classifier_weights(loaded.model.config, loaded.spec.positive_label)

    def open(self, m: Open) -> Opened:
        self.sessions[m.sid] = EncoderSession(list(m.prompts), list(m.owners))
        return Opened(needs_text=True)

    @torch.no_grad()
    def chunk(self, m: Chunk) -> Scores:
        session, loaded = self.sessions[m.sid], self.models[0]
        template = loaded.spec.template or "{prompt}"
        pairs = [template.format(prompt=p) + t for p, t in zip(session.prompts, m.texts)]
        enc = loaded.tokenizer(pairs, return_tensors="pt", padding=True, truncation=True).to(loaded.device)
        for owner, n in zip(session.owners, enc.attention_mask.sum(-1).tolist()):
            session.counts[owner] += n
        logits = upcast(loaded.model(**enc).logits)
        return Scores((logits @ self.label_weights.to(logits)).double().cpu().numpy())


class EncoderSession:
    """A bidirectional classifier's session: the prompts and who pays for each row, no cache."""

    def __init__(self, prompts: list[str], owners: list):
        self.prompts, self.owners = prompts, owners
        self.counts = Counter()

    def select(self, rows: list[int]) -> None:
        self.prompts = [self.prompts[r] for r in rows]
        self.owners = [self.owners[r] for r in rows]

    def tokens(self) -> Counter:
        return self.counts


def explicit_role(loaded: LoadedModel, base_tokenizer) -> Role:
    """The explicit value's role for this model: token RM, causal classifier or bidirectional classifier."""
    if loaded.spec.kind == "token_reward":
        return TokenRewardRole([loaded], base_tokenizer)
    if hasattr(loaded.model, "score"):
        return CausalClassifierRole(loaded, base_tokenizer)
    return EncoderClassifierRole(loaded, base_tokenizer)


def classifier_weights(config, positive_label: str | None) -> torch.Tensor:
    """score = logits @ weights: logit 0 of a scalar RM, or POSITIVE - NEGATIVE of two labels."""
    n = config.num_labels
    if n == 1:
        return torch.ones(1)
    if n == 2 and positive_label is not None:
        label2id = {str(k).lower(): v for k, v in config.label2id.items()}
        if positive_label.lower() not in label2id:
            raise ValueError(f"positive_label {positive_label!r} is not a label of this classifier: "
                             f"{sorted(config.label2id)}")
        weights = -torch.ones(2)
        weights[label2id[positive_label.lower()]] = 1.0
        return weights
    raise ValueError(f"a classifier with {n} labels needs num_labels=1 or 2 labels and positive_label")
