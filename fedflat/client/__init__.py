"""What runs on a client: the local update (``update``) and its chain of steps
(``local_chain``: oracle → corrections → gradient clip, then the base optimizer), the oracle
interface and update context (``oracle_base``), the SAM family and the oracle registry
(``oracles``), the drift corrections' client halves (``local_corrections``: FedProx, SCAFFOLD,
FedDyn, MoFedSAM; their server halves are ``fedflat.server.correction_state``), the base
optimizers (``optim``), the uplink chain (``uplink``: clip → noise → codec), adversarial
training, zeroth-order estimators and the vectorised engine (``vectorized``). Nothing here
imports Ray or Flower."""
