"""Runtime: the round loop, backends (serial, Ray), checkpoints."""
