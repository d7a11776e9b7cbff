"""The sweep at the paper's settings (sweep.py), its claims and figures (claims.py) and the model export
(export_models.py); run each from the repository root as `python -m experiments.<name>`."""
