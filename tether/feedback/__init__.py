"""tether.feedback: the human-feedback annotation web app (`tether label`).

Annotators compare, rank or rate model outputs in a browser; every judgment is stored in a SQL
database (SQLite by default, PostgreSQL by URL) and exported as preference records that
`tether rm` and `tether dpo` read directly.

This package must never import torch or transformers (it has to start fast on a small server);
only `tether label generate` reaches the training side, lazily.
"""
