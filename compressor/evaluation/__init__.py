"""Evaluation: perplexity and speed (``evaluate``, ``speed``), zero-shot tasks (``zeroshot``), tables (``compare``)."""
