"""Generation metrics from maintained libraries: exact match, ROUGE-L (rouge_score), chrF and BLEU (sacrebleu).

Every score is on a 0-1 scale (sacrebleu's 0-100 divided by 100), so one margin means the same
for every metric. `sample_scores` scores one answer (for the samples table); `corpus_scores` scores
a set: exact match and ROUGE-L as the mean over samples, chrF and BLEU as sacrebleu corpus scores.
BLEU uses the effective n-gram order, so short answers without 4-grams still get a non-zero score.

Scripts written without spaces between words (Chinese, Japanese, Thai, ...) are scored per character
for ROUGE-L and BLEU, as sacrebleu's `zh` tokenizer does for Chinese: rouge_score's default tokenizer
keeps only a-z and 0-9 (Chinese would score 0), and BLEU's 13a takes an unspaced sentence as one word.
Text in spaced scripts scores as before; ROUGE-L keeps letters of any alphabet (é, я) in its words.

Example:
    >>> sample_scores("one two three", "one two four", ["exact_match", "rouge_l"])
    {'exact_match': 0.0, 'rouge_l': 0.6667}
    >>> sample_scores("今天天气很好", "今天天气不错", ["rouge_l"])
    {'rouge_l': 0.6667}
    >>> corpus_scores(["four two", "fox"], ["four two", "owl"], ["exact_match", "chrf"])
    {'exact_match': 0.5, 'chrf': 0.8972}
"""

from __future__ import annotations

from functools import cache
from typing import Any

import regex

# Characters of scripts without spaces between words, and CJK punctuation: each is a token of its own.
UNSPACED = regex.compile(
    r"([\p{Han}\p{Hiragana}\p{Katakana}\p{Thai}\p{Lao}\p{Khmer}\p{Myanmar}\p{Tibetan}\u3000-\u303f\uff00-\uffef])"
)
WORD = regex.compile(r"[^\W_]+")  # letters and digits of any script, as rouge_score's [a-z0-9]+ for English

METRIC_NAMES = ("exact_match", "rouge_l", "chrf", "bleu")
DIGITS = 4


def sample_scores(prediction: str, reference: str, metrics: list[str]) -> dict[str, float]:
    """Each metric in `metrics` for one prediction against its reference."""
    scorers = {"exact_match": _exact, "rouge_l": _rouge_l, "chrf": _chrf_sentence, "bleu": _bleu_sentence}
    return {name: round(scorers[name](prediction, reference), DIGITS) for name in _checked(metrics)}


def corpus_scores(predictions: list[str], references: list[str], metrics: list[str]) -> dict[str, float]:
    """Each metric in `metrics` over a whole set of predictions; 0.0 for an empty set."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        return dict.fromkeys(_checked(metrics), 0.0)
    result = {}
    for name in _checked(metrics):
        if name in ("chrf", "bleu"):
            prepared = _for_sacrebleu(name)
            scored = _sacrebleu(name).corpus_score(
                [prepared(p) for p in predictions], [[prepared(r) for r in references]]
            )
            score = scored.score / 100
        else:
            score = sum(sample_scores(p, r, [name])[name] for p, r in zip(predictions, references, strict=True)) / len(
                references
            )
        result[name] = round(score, DIGITS)
    return result


def _checked(metrics: list[str]) -> list[str]:
    unknown = sorted(set(metrics) - set(METRIC_NAMES))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {', '.join(METRIC_NAMES)}")
    return list(metrics)


def _exact(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def _rouge_l(prediction: str, reference: str) -> float:
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def _chrf_sentence(prediction: str, reference: str) -> float:
    return float(_sacrebleu("chrf").sentence_score(prediction, [reference]).score) / 100


def _bleu_sentence(prediction: str, reference: str) -> float:
    return float(_sacrebleu("bleu").sentence_score(spaced(prediction), [spaced(reference)]).score) / 100


def spaced(text: str) -> str:
    """Spaces around each character of an unspaced script, so word-based metrics see one token per character.

    >>> spaced("我爱 NLP")
    ' 我  爱  NLP'
    """
    return UNSPACED.sub(r" \1 ", text)


def _for_sacrebleu(name: str) -> Any:
    return spaced if name == "bleu" else str  # chrF counts character n-grams already


class ScriptAwareTokenizer:
    """rouge_score's tokenizer interface: lower-cased words in any script, one token per unspaced character.

    >>> ScriptAwareTokenizer().tokenize("Das Café, 今日は!")
    ['das', 'café', '今', '日', 'は']
    """

    def tokenize(self, text: str) -> list[str]:
        return list(WORD.findall(spaced(text).lower()))


@cache
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=ScriptAwareTokenizer())


@cache
def _sacrebleu(name: str) -> Any:
    from sacrebleu.metrics import BLEU, CHRF

    # Effective order: answers of a few words have no 4-grams, which would zero plain BLEU.
    return CHRF() if name == "chrf" else BLEU(effective_order=True)
