"""Turning guided logits into tokens, deterministically per prompt, and deciding when rows stop.

Order of logits processing (as in HF generation): guided logits z -> temperature -> top-k -> top-p
-> softmax -> inverse-CDF sample with one uniform per row. Each prompt owns a generator seeded by
(run seed, prompt id) and draws its rows' uniforms in row order, so a prompt's output does not
depend on which other prompts share its batch.
"""

import hashlib

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from ivg.config import DecodeConfig
from ivg.guidance import upcast


def prompt_seed(seed: int, prompt_id: str) -> int:
    """The rule (ivg/reference.py writes it again): the first 8 bytes of sha256 of
    f"{seed}\\x00{prompt_id}", read little-endian, mod 2**63, seed a torch.Generator; a step draws
    torch.rand(rows of the prompt, dtype=float64) from it."""
    digest = hashlib.sha256(f"{seed}\x00{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def prompt_generator(seed: int, prompt_id: str) -> torch.Generator:
    return torch.Generator().manual_seed(prompt_seed(seed, prompt_id))


def warpers(decode: DecodeConfig) -> LogitsProcessorList:
    chain = LogitsProcessorList()
    if decode.temperature > 0 and decode.temperature != 1.0:
        chain.append(TemperatureLogitsWarper(decode.temperature))
    if decode.top_k > 0:
        chain.append(TopKLogitsWarper(decode.top_k))
    if decode.top_p < 1.0:
        chain.append(TopPLogitsWarper(decode.top_p))
    return chain


def sample(z: torch.Tensor, uniforms: torch.Tensor, decode: DecodeConfig,
           warp: LogitsProcessorList | None = None) -> torch.Tensor:
    """z (B, V) guided logits, uniforms (B,) in [0, 1) -> tokens (B,); `warp`: warpers(decode), if built."""
    if decode.temperature == 0:
        return z.argmax(-1)
    z = (warp if warp is not None else warpers(decode))(None, upcast(z))
    cdf = torch.softmax(z, -1).double().cumsum(-1)  # float64: stable, batch-independent boundaries
    u = (uniforms.to(cdf.device) * cdf[:, -1])[:, None]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=z.shape[-1] - 1)


class Stopper:
    """When a row is done (EOS, a stop string, max_new_tokens) and what its response text is."""

    def __init__(self, tokenizer, decode: DecodeConfig, eos_ids: set[int]):
        self.tokenizer, self.decode = tokenizer, decode
        self.eos_ids = eos_ids if decode.stop_at_eos else set()
        self.eos = torch.tensor(sorted(self.eos_ids), dtype=torch.long)
        # enough trailing tokens to contain any stop string, even with sub-character tokens
        self.window = max((len(s) for s in decode.stop), default=0) + 4
        self._may_stop: torch.Tensor | None = None

    @property
    def may_stop(self) -> torch.Tensor:
        """(V,) bool: the tokens whose text, appended to a response, could complete a stop string.

        A stop string that appears once token v is appended overlaps v's text (the text of a token
        list is the concatenation of its tokens' texts, after the text that holds none), so only a
        token whose text holds a character of a stop string can end a row. Its text is read in
        context, after a plain token (a leading space is its own there); a token whose text is empty,
        partial (a split UTF-8 character) or changes the text before it is always checked."""
        if self._may_stop is None:
            chars = set("".join(self.decode.stop))
            tok = self.tokenizer
            probe = tok("a", add_special_tokens=False).input_ids[:1] or [0]
            head = tok.decode(probe, skip_special_tokens=True)
            texts = tok.batch_decode([probe + [v] for v in range(len(tok))], skip_special_tokens=True)
            self._may_stop = torch.tensor([not t.startswith(head) or len(t) == len(head) or "\ufffd" in t
                                           or bool(chars & set(t[len(head):])) for t in texts])
        return self._may_stop

    def stops(self, newest: torch.Tensor, lengths: torch.Tensor, history,
              limits: torch.Tensor | None = None) -> torch.Tensor:
        """(rows,) bool: done(response, limit) for rows whose response is `lengths` (rows,) tokens long
        and ends in `newest` (rows,), each live before that token, as tensor operations (`limits`
        (rows,): each row's own max_new_tokens); the text of a row is decoded (`history(i)`: its
        response tokens) only where the newest token may complete a stop string."""
        if limits is None:
            limits = torch.full_like(lengths, self.decode.max_new_tokens)
        done = lengths >= limits
        if len(self.eos):
            done |= torch.isin(newest, self.eos)
        if self.decode.stop:
            V = len(self.may_stop)  # a model's vocab can be padded past its tokenizer's: check those too
            maybe = self.may_stop[newest.clamp(0, V - 1)] | (newest >= V)
            for i in (maybe & ~done).nonzero().flatten().tolist():
                done[i] = self.done(history(i), int(limits[i]))
        return done

    def done(self, tokens: list[int], max_new_tokens: int | None = None) -> bool:
        """Ended (EOS, a stop string) or at max_new_tokens (this row's own limit when given)."""
        if len(tokens) >= (max_new_tokens or self.decode.max_new_tokens) or (tokens and tokens[-1] in self.eos_ids):
            return True
        if self.decode.stop:
            tail = self.tokenizer.decode(tokens[-self.window:], skip_special_tokens=True)
            return any(s in tail for s in self.decode.stop)
        return False

    def ended(self, tokens: list[int]) -> bool:
        """The response ended by itself, on EOS or a stop string (not merely cut at max_new_tokens)."""
        if tokens and tokens[-1] in self.eos_ids:
            return True
        tail = self.tokenizer.decode(tokens[-self.window:], skip_special_tokens=True) if self.decode.stop else ""
        return any(s in tail for s in self.decode.stop)

    def text(self, tokens: list[int]) -> str:
        """The response: EOS dropped, cut before the first stop string."""
        body = tokens[:-1] if tokens and tokens[-1] in self.eos_ids else tokens
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        cuts = [text.find(s) for s in self.decode.stop if s in text]
        return text[:min(cuts)] if cuts else text
