"""phi3flow: the tested package behind this MLflow project's steps (see README.md)."""
