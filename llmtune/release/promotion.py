"""The promotion gate: does the tuned model beat the base by the configured margin, and not fall behind production?

The gate reads the evaluate step's report: `base_<metric>`, `tuned_<metric>` and, when a production
version existed, `champion_<metric>` scored on the same held-out rows with the same template. Loss
and perplexity are better when lower, every other metric when higher; margins are in the metric's
own units. The result is a `Verdict` whose `text` is the one line a user reads at the end of a run.

Example:
    >>> cfg = PromotionConfig(metric="exact_match", min_improvement_over_base=0.05, promote_to="production")
    >>> verdict = decide({"base_exact_match": 0.25, "tuned_exact_match": 0.5}, cfg)
    >>> verdict.passed
    True
    >>> verdict.text
    'PROMOTE to production: tuned exact_match 0.5 beats base 0.25 by 0.25 (needs 0.05); no production version yet.'
    >>> report = {"base_eval_loss": 1.0, "tuned_eval_loss": 0.8, "champion_eval_loss": 0.7}
    >>> print(decide(report, PromotionConfig(), champion_version="3").text)
    REJECTED, not merged or published: tuned eval_loss 0.8 falls behind production version 3 (0.7) by 0.1, ...
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from llmtune.config import PromotionConfig

LOWER_IS_BETTER = ("eval_loss", "perplexity")


@dataclass(frozen=True)
class Verdict:
    """The gate's decision with the numbers behind it; `text` is the line the run ends with."""

    passed: bool
    metric: str
    base: float
    tuned: float
    gain_over_base: float
    champion: float | None
    gain_over_champion: float | None
    champion_version: str | None
    promote_to: str | None
    reasons: list[str] = field(default_factory=list)
    text: str = ""

    def as_metadata(self) -> dict[str, Any]:
        """Flat values for ZenML metadata and MLflow tags (None becomes an empty string)."""
        flat = {f"gate_{k}": v for k, v in asdict(self).items() if k not in ("reasons", "text")}
        flat["gate_verdict"] = self.text
        return {k: "" if v is None else v for k, v in flat.items()}


def gain(metric: str, new: float, old: float) -> float:
    """How much better `new` is than `old` for `metric` (positive = better), in the metric's units.

    >>> gain("eval_loss", 0.8, 1.0), gain("rouge_l", 0.7, 0.5)
    (0.2, 0.2)
    """
    delta = old - new if metric in LOWER_IS_BETTER else new - old
    return round(delta, 6)


def decide(report: dict[str, Any], cfg: PromotionConfig, champion_version: str | None = None) -> Verdict:
    """Apply the gate in `cfg` to an eval report (see the module example); `champion_version` names production."""
    metric = cfg.metric
    base, tuned = _score(report, "base", metric), _score(report, "tuned", metric)
    recorded = report.get(f"champion_{metric}")
    champion = None if recorded is None else float(recorded)
    over_base = gain(metric, tuned, base)
    over_champion = None if champion is None else gain(metric, tuned, champion)
    reasons = []
    if over_base < cfg.min_improvement_over_base:
        reasons.append(
            f"tuned {metric} {tuned:.4g} vs base {base:.4g}: a gain of {over_base:.4g}, "
            f"under the required {cfg.min_improvement_over_base:.4g} (promotion.min_improvement_over_base)"
        )
    version = champion_version or "?"
    if over_champion is not None and over_champion < -cfg.max_regression_vs_production:
        reasons.append(
            f"tuned {metric} {tuned:.4g} falls behind production version {version} ({champion:.4g}) by "
            f"{-over_champion:.4g}, more than the allowed {cfg.max_regression_vs_production:.4g} "
            "(promotion.max_regression_vs_production)"
        )
    verdict = Verdict(
        passed=not reasons,
        metric=metric,
        base=base,
        tuned=tuned,
        gain_over_base=over_base,
        champion=champion,
        gain_over_champion=over_champion,
        champion_version=None if champion is None else version,
        promote_to=cfg.promote_to,
        reasons=reasons,
    )
    return _with_text(verdict, cfg)


def _score(report: dict[str, Any], who: str, metric: str) -> float:
    key = f"{who}_{metric}"
    if key not in report:
        known = sorted(k.removeprefix("tuned_") for k in report if k.startswith("tuned_"))
        raise KeyError(f"promotion.metric={metric} is not in the eval report; it has: {', '.join(known)}")
    return float(report[key])


def _with_text(verdict: Verdict, cfg: PromotionConfig) -> Verdict:
    if not verdict.passed:
        text = "REJECTED, not merged or published: " + "; ".join(verdict.reasons) + "."
    else:
        action = f"PROMOTE to {cfg.promote_to}" if cfg.promote_to else "PASSED (promotion.promote_to is null)"
        text = (
            f"{action}: tuned {verdict.metric} {verdict.tuned:.4g} beats base {verdict.base:.4g} by "
            f"{verdict.gain_over_base:.4g} (needs {cfg.min_improvement_over_base:.4g})"
        )
        if verdict.champion is None:
            text += "; no production version yet."
        else:
            text += (
                f" and is {verdict.gain_over_champion:+.4g} against production version {verdict.champion_version} "
                f"({verdict.champion:.4g}; allowed regression {cfg.max_regression_vs_production:.4g})."
            )
    return Verdict(**{**asdict(verdict), "text": text})


def unchanged(champion_version: str | None) -> dict[str, Any]:
    """The verdict of a run whose (cached) adapter is production's own: a scheduled run on unchanged data and config.

    >>> unchanged("3")["gate_unchanged"], unchanged("3")["gate_passed"]
    (True, False)
    """
    text = (
        f"UNCHANGED: this run's adapter is production version {champion_version}'s (same data and config, training "
        "cached); nothing merged, published or promoted."
    )
    return {"gate_verdict": text, "gate_unchanged": True, "gate_passed": False}


def verdict_tag(verdict: dict[str, Any]) -> str:
    """The MLflow tag `llmtune.verdict` of a verdict's metadata: promoted, rejected or unchanged.

    >>> verdict_tag(unchanged("1")), verdict_tag({"gate_passed": True})
    ('unchanged', 'promoted')
    """
    if verdict.get("gate_unchanged"):
        return "unchanged"
    return "promoted" if verdict.get("gate_passed") else "rejected"
