"""What runs on the server: the pipeline of server steps (``pipeline``), aggregation rules and
pre-aggregators (the ``rules`` package), server optimizers (``optimizers``, ``fedopt``), the
server halves of the corrections (``corrections``) and SWA (``swa``). Nothing here imports
Ray or Flower."""
