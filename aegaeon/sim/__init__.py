"""The discrete-event simulator (``aegaeon sim``): the real policy classes against a cost model.

- :mod:`~aegaeon.sim.hardware`: roofline cost model of H800, H100, H20, A100 (and the CPU);
  the paper's 7B/9B/13B model mix.
- :mod:`~aegaeon.sim.instance`: one instance executing TurnPlans in closed form.
- :mod:`~aegaeon.sim.engine`: the event loop (arrivals, turn ends) → per-token timestamps.
- :mod:`~aegaeon.sim.run`: deployments, one run, the fewest-GPUs bisection.
- :mod:`~aegaeon.sim.study`: GPUs needed per policy; the paper's grid.
- :mod:`~aegaeon.sim.cli` / :mod:`~aegaeon.sim.report`: the command and its tables.
"""
