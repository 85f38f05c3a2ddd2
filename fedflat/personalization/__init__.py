"""Personalized federated learning: local fine-tuning, Ditto, APFL (``personalization:``).

``methods`` holds the pure personal updates; ``runner`` plugs them into the serial run
driver (per-client test splits, personal models in the client state, per-client evaluation).
"""
