"""Training the guides offline: a DPO-tuned LM (the implicit value against its untuned start), a token
reward model and a reward probe (explicit values). Needs the `train` extra (trl, peft, scikit-learn).

  config.py    TrainSettings, TrainConfig, ProbeConfig: the `train:` section and the probe's
  pairs.py     sample pairs from the untuned model, label them by the gold, encode, measure accuracy
  dpo.py       TRL DPO (LoRA merged back, or full) -> the tuned model
  token_rm.py  FUDGE-style token reward model Q(s_<t, a_t)
  heads.py     LoRA settings, the Q head, saving
  guides.py    all of it, built once per key into the cache, with model cards (cards.py)
  probe.py     a linear head on a frozen LM body, fitted to labelled texts
"""
