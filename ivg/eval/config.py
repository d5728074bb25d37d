"""What judges a finished run: the gold reward model and, for instruction following, AlpacaEval.

    eval:
      gold: {name: auto, kind: offline_sentiment, format: "{prompt}{response}"}
      alpaca:                        # only for instruction following
        judge: offline               # or an alpaca_eval annotator config, e.g. weighted_alpaca_eval_gpt4_turbo
        judge_model: null            # offline judge reward model (a gold spec); null = the gold model above
        reference: column            # rows' `reference` column, `method:<name>`, or a parquet/jsonl/json(.gz)
        glm_inputs: null             # folder with df_gamed.csv, instruction_difficulty.csv (else the HF cache)

Frozen dataclasses loaded by ivg.config.from_dict like every other section; errors name the field.
"""

from dataclasses import dataclass
from pathlib import PurePath

from ivg.config import check

GOLD_KINDS = ("classifier", "scalar", "offline_sentiment", "vader")
GOLD_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class GoldSpec:
    name: str  # HF id or folder; offline_sentiment: the folder that holds (or will hold) the model, "auto" = cache
    kind: str = "classifier"  # one of GOLD_KINDS
    positive_label: str = "POSITIVE"  # classifier: looked up in config.id2label
    negative_label: str = "NEGATIVE"
    format: str = "{prompt}{response}"  # the text the gold model reads
    batch_size: int = 32
    device: str = "cpu"
    dtype: str = "float32"  # one of GOLD_DTYPES
    max_length: int = 512  # tokens; longer texts are truncated (from the right)
    revision: str | None = None  # hub models: a commit or tag that pins the weights (else the cached one)

    def validate(self, where: str = "gold") -> None:
        check(bool(self.name), f"{where}.name", "must be a model id or folder (offline_sentiment: 'auto' or a folder)")
        check(self.kind in GOLD_KINDS, f"{where}.kind", f"{self.kind!r} is not one of {GOLD_KINDS}")
        check(self.dtype in GOLD_DTYPES, f"{where}.dtype", f"{self.dtype!r} is not one of {GOLD_DTYPES}")
        for name in ("batch_size", "max_length"):
            check(getattr(self, name) >= 1, f"{where}.{name}", "must be >= 1")
        try:
            self.format.format(prompt="", response="")
        except (KeyError, IndexError, ValueError) as e:
            check(False, f"{where}.format", f"may only use {{prompt}} and {{response}}: {self.format!r} ({e})")


@dataclass(frozen=True)
class AlpacaConfig:
    judge: str = "offline"
    judge_model: GoldSpec | None = None
    reference: str = "column"
    reference_generator: str = "reference"
    glm_inputs: str | None = None

    def validate(self, where: str = "eval.alpaca") -> None:
        check(bool(self.judge), f"{where}.judge", "must be 'offline' or an alpaca_eval annotator config")
        if self.judge_model is not None:
            self.judge_model.validate(f"{where}.judge_model")


@dataclass(frozen=True)
class EvalConfig:
    gold: GoldSpec | None = None
    alpaca: AlpacaConfig | None = None
    evaluated_dir: str = "evaluated"  # under the run dir: samples.parquet, annotations/
    summary: str = "summary.parquet"
    report: str = "report.md"
    plot: str = "report.png"

    def __post_init__(self):
        self.validate()

    def validate(self, where: str = "eval") -> None:
        for name in ("evaluated_dir", "summary", "report", "plot"):  # all under the run directory
            path = PurePath(getattr(self, name))
            check(not path.is_absolute() and ".." not in path.parts and bool(path.parts), f"{where}.{name}",
                  f"{str(path)!r} must be a relative path inside the run directory")
        check(self.gold is not None or self.alpaca is not None, where,
              "set eval.gold, eval.alpaca, or both; there is nothing to evaluate")
        if self.gold is not None:
            self.gold.validate(f"{where}.gold")
        if self.alpaca is not None:
            self.alpaca.validate(f"{where}.alpaca")
            check(self.alpaca.judge != "offline" or self.alpaca.judge_model is not None or self.gold is not None,
                  f"{where}.alpaca.judge_model", "the offline judge needs a reward model (or set eval.gold)")
