"""The stages: what each one reads from and logs to MLflow, built on the libraries (``steering``,
``evaluation``, ``analysis``) and ``core``; the entry points parse arguments and call them."""
