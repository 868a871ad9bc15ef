"""Drop-in OSPO for existing trainers.

* :mod:`ospo_fast.integrations.trl`: ``OSPOGRPOTrainer``, a ``trl.GRPOTrainer`` with per-token advantages.
* :mod:`ospo_fast.integrations.verl`: the ``"ospo"`` advantage estimator and reward manager for verl.
* :mod:`ospo_fast.integrations.common`: what both share (completion tokens -> Owen-value token credit).

Importing this package imports neither TRL nor verl; each is imported by its own module.
"""
