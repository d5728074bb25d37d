"""The held-out layout: which prompts the guides train on, and which measure them.

jobs.run cuts the shuffled prompt table into consecutive blocks (jobs/run.py `split_prompts`):

    [ skip | evaluated (n) | guide prompts ............................................. ]
                            [ held out (heldout_prompts) | training (n_prompts, deduplicated) ]

The held-out prompts give one gold-ordered pair each, on which both values are measured; nothing
trains on them. A training prompt whose text repeats an evaluated or a held-out opening, or an
earlier training prompt, is dropped: short openings ("This movie is one of") recur in the table,
and a repeat would leak the held-out or evaluated prompt into training.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    heldout: tuple[str, ...]  # one pair each, measured on, never trained on
    train: tuple[str, ...]  # the training prompts, in table order, no repeats

    def __post_init__(self):
        assert not set(self.heldout) & set(self.train), "a held-out prompt is among the training prompts"


def guide_layout(guide_prompts: list[str], evaluated: list[str], heldout_prompts: int, n_prompts: int) -> Layout:
    """The first `heldout_prompts` guide prompts held out, then the first `n_prompts` of the rest that
    repeat no evaluated, held-out or earlier training prompt. Raises if there are too few."""
    from ivg.config import check

    check(len(guide_prompts) >= heldout_prompts, "train.settings.heldout_prompts",
          f"asks for {heldout_prompts} held-out prompts but only {len(guide_prompts)} guide prompts were given")
    heldout = list(guide_prompts[:heldout_prompts])
    banned, train = set(evaluated) | set(heldout), []
    for prompt in guide_prompts[heldout_prompts:]:
        if len(train) == n_prompts:
            break
        if prompt not in banned:
            banned.add(prompt)
            train.append(prompt)
    check(len(train) == n_prompts, "train.settings.n_prompts",
          f"asks for {n_prompts} training prompts but only {len(train)} distinct ones are left after the "
          f"{heldout_prompts} held-out prompts (of {len(guide_prompts)} guide prompts)")
    return Layout(tuple(heldout), tuple(train))
