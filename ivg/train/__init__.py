"""Training the guides offline: a DPO-tuned LM (the implicit value against its untuned start), a token
reward model and a reward probe (explicit values). Needs the `train` extra (scikit-learn).

  config.py      TrainSettings, DPOSettings, TokenRMSettings, TrainConfig: the `train:` section; the probe's
  layout.py      the held-out layout: held-out prompts, deduplicated training prompts
  pairs.py       sample responses from the untuned model, score them by the gold, measure a value's accuracy
  features.py    one float32 forward of the untuned model over every response (reference log-probs, states)
  top_layers.py  fine-tuning only the top layers, fed the cached states below them (exact)
  dpo.py         DPO in its ranking form over each prompt's responses (optional early stopping) -> the tuned model
  token_rm.py    the token reward model: frozen body + fitted head W[a] = w + b_a c
  heads.py       the Q head, saving
  guides.py      all of it, built once per key into the cache, with model cards (cards.py)
  probe.py       a linear head on a frozen LM body, fitted to labelled texts
"""
