"""The vectorised stop check equals Stopper.done, which decodes every row's tail, on random responses
(each a live row, as in a search, plus its newest token)."""

import random

import pytest
import torch

from ivg.config import DecodeConfig
from ivg.sampling import Stopper
from ivg.tiny import tiny_tokenizer


@pytest.mark.parametrize("family", ["tiny", "tiny-b"])  # char-level, and BPE with merged tokens
@pytest.mark.parametrize("stop", [("\n",), ("e", "th"), ("the end", "!")])
def test_stops_equals_done_on_random_responses(family, stop):
    tok = tiny_tokenizer(family)
    stopper = Stopper(tok, DecodeConfig(max_new_tokens=12, stop=stop), {tok.eos_token_id})
    rng = random.Random(0)
    common = [tok(w, add_special_tokens=False).input_ids for w in ("the", " end", "e", "!", "\n", "x", " t", "h")]
    responses = []
    for _ in range(400):  # grown token by token the way a search grows them: a row ends when done
        r = []
        while not r or not stopper.done(r):
            r.append(rng.choice(rng.choice(common)) if rng.random() < 0.5 else rng.randrange(len(tok)))
            responses.append(list(r))
    newest = torch.tensor([r[-1] for r in responses])
    lengths = torch.tensor([len(r) for r in responses])
    got = stopper.stops(newest, lengths, lambda i: responses[i]).tolist()
    assert got == [stopper.done(r) for r in responses]
    assert 0 < sum(got) < len(got)  # both outcomes occur
    assert stopper.may_stop.sum() < len(stopper.may_stop)  # and the filter spares some decodes
