"""Evaluation: base against tuned on held-out rows (`scoring`), the answer metrics (`metrics`) and an optional
LLM judge (`judge`).

Example:
    >>> from llmtune.evaluate import metrics
    >>> metrics.corpus_scores(["a b"], ["a b"], ["exact_match"])
    {'exact_match': 1.0}
"""
