"""What every layer of truthsteer shares: the config (``core.config``), the TruthfulQA questions and
splits (``core.data``), the neutral text of the side-effect metrics (``core.corpus``), model loading (``core.models``), MLflow runs (``core.tracking``) and the
names of the artifacts the stages write and read (``core.artifacts``).

Nothing here imports ``steering``, ``evaluation``, ``analysis``, ``stages`` or ``entrypoints``.
"""
