"""What runs on a client: the local update (``update``), its oracles (``oracle`` defines the
interface, ``oracles`` the SAM family and their registry), the drift corrections
(``correction`` interface, FedProx/SCAFFOLD/FedDyn there too), the base optimizer (``optim``),
the uplink chain (``uplink``: clip → noise → codec), adversarial training, zeroth-order
estimators and the vectorised engine (``vectorized``). Nothing here imports Ray or Flower."""
