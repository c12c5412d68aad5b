"""Training: supervised fine-tuning of the adapter (`sft`), in the step's process or data-parallel across GPUs
(`distributed`), with GPU memory errors a user can act on (`memory`).

Example:
    >>> from llmtune.train import sft
    >>> sft.pad_multiple(sft.TrainingConfig(), 2048)
    8
"""
