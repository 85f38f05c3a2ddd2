"""Decentralized (serverless) training: graphs, mixing matrices, gossip and CHOCO-SGD.

``topology`` and ``gossip`` are pure (numpy / torch, no runtime); ``runner`` plugs a
gossip round into the run driver (``fedflat.runtime.run``) and therefore sits at the
runtime layer.
"""
