"""fedflat on Flower (flwr 1.42, Message API): fedflat's own client update and server pipeline.

Only this package imports Flower; the client and server code it runs never do.

* :mod:`fedflat.flower.messages` - ``RoundPayload`` / ``ClientJob`` / client state <-> a train
  message's ``RecordDict``, ``ClientResult`` <-> the reply (bit-exact tensors).
* :mod:`fedflat.flower.client_app` - the ClientApp (``app``): a node trains the client its
  ``partition-id`` names, with a cached ``ClientWorker``.
* :mod:`fedflat.flower.server_app` - the ServerApp (``app``): fedflat's ``Runner`` with a
  backend that sends each sampled client's job to its node over ``Grid``.
* :mod:`fedflat.flower.simulate` - ``fedflat flower simulate``: Flower's simulation engine.
* :mod:`fedflat.flower.app` - ``fedflat flower app``: a Flower app folder for ``flwr run``.
* :mod:`fedflat.flower.cli` - the ``flower`` subcommands.

Install with ``pip install -e '.[flower]'`` (``flwr[simulation]==1.42.0``).
"""
