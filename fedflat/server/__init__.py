"""What runs on the server: the pipeline of server steps (``pipeline``), aggregation rules and
pre-aggregators (the ``rules`` package), server optimizers (``optimizers``, ``fedopt``), the
server halves of the drift corrections and the state they keep (``correction_state``) and SWA
(``swa``). Nothing here imports Ray or Flower."""
