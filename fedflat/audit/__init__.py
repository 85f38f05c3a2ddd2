"""Empirical privacy audits of whole scenarios: applications of the runtime.

The audit statistics live in :mod:`fedflat.privacy.audit` (no runtime imports); this package
trains a scenario's real mechanism on canaries (:mod:`fedflat.audit.scenario_audit`) and is
the ``fedflat audit`` command (:mod:`fedflat.audit.cli`).
"""
