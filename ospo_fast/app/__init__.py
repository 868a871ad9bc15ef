"""The application layer: what ``ospo-fast`` runs on top of the library.

- :mod:`~ospo_fast.app.cli`: the ``ospo-fast`` command (train, eval, compare, attribute, demo);
- :mod:`~ospo_fast.app.experiment`: the generative-search runs (task, policy, training, evaluation);
- :mod:`~ospo_fast.app.report`: a run's report and plots;
- :mod:`~ospo_fast.app.comparison`: variants compared seed by seed, with paired intervals;
- :mod:`~ospo_fast.app.credit`: the credit benchmark (answers whose segments' worth is known);
- :mod:`~ospo_fast.app.stats`: intervals and power;
- :mod:`~ospo_fast.app.tiny`: the tiny policy of tests and demos;
- :mod:`~ospo_fast.app.warm_start`: the supervised warm start to the answer format.

``import ospo_fast`` does not import this layer (nor matplotlib, pandas or scipy, which it uses).
"""
