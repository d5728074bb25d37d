"""The `eval` section of a run config: what judges a finished generate run, and where results go.

    eval:
      gold: {name: auto, kind: offline_sentiment, format: "{prompt}{response}"}
      alpaca:                        # only for instruction following
        judge: offline               # or an alpaca_eval annotator config, e.g. weighted_alpaca_eval_gpt4_turbo
        judge_model: null            # offline judge reward model (a gold spec); null = the gold model above
        reference: column            # rows' `reference` column, or a parquet/jsonl/json(.gz) with id, reference[, index]
        glm_inputs: null             # folder with df_gamed.csv, instruction_difficulty.csv (else the HF cache)
"""

from dataclasses import dataclass, fields
from pathlib import PurePath

from ivg.gold import GoldSpec


@dataclass
class AlpacaConfig:
    judge: str = "offline"
    judge_model: GoldSpec | None = None
    reference: str = "column"
    reference_generator: str = "reference"
    glm_inputs: str | None = None


@dataclass
class EvalConfig:
    gold: GoldSpec | None = None
    alpaca: AlpacaConfig | None = None
    evaluated_dir: str = "evaluated"  # under the run dir: samples.parquet, annotations/
    summary: str = "summary.parquet"
    report: str = "report.md"
    plot: str = "report.png"

    def __post_init__(self):
        for name in ("evaluated_dir", "summary", "report", "plot"):  # all under the run directory
            path = PurePath(getattr(self, name))
            if path.is_absolute() or ".." in path.parts or not path.parts:
                raise ValueError(f"eval.{name}: {str(path)!r} must be a relative path inside the run directory")
        if self.gold is None and self.alpaca is None:
            raise ValueError("eval: set eval.gold, eval.alpaca, or both; there is nothing to evaluate")
        if self.alpaca and self.alpaca.judge == "offline" and self.alpaca.judge_model is None and self.gold is None:
            raise ValueError("eval.alpaca.judge_model: the offline judge needs a reward model (or set eval.gold)")

    @classmethod
    def from_dict(cls, d: dict) -> "EvalConfig":
        d = dict(d)
        _check_keys(cls, d, "eval")
        if d.get("gold") is not None:
            d["gold"] = _gold(d["gold"], "eval.gold")
        if d.get("alpaca") is not None:
            a = dict(d["alpaca"])
            _check_keys(AlpacaConfig, a, "eval.alpaca")
            if a.get("judge_model") is not None:
                a["judge_model"] = _gold(a["judge_model"], "eval.alpaca.judge_model")
            d["alpaca"] = AlpacaConfig(**a)
        return cls(**d)


def _check_keys(cls, d: dict, where: str):
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(d).__name__}")
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")


def _gold(d: dict, where: str) -> GoldSpec:
    _check_keys(GoldSpec, d, where)
    try:
        return GoldSpec(**d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None
