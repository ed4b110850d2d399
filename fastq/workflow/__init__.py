"""Workflows: typed DAGs of tasks (``app.workflow``). ``graph`` defines and checks them,
``run`` is the state machine the supervisor drives, ``state`` the values and storage they share.
This package imports nothing by itself: the broker imports ``state`` and ``run`` without the
user API above them."""
