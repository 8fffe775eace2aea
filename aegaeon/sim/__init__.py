"""The discrete-event simulator (``aegaeon sim``): the real policy classes against a cost model.

- :mod:`~aegaeon.sim.hardware`: roofline cost model of H800, H100, H20, A100 (and the CPU);
  the paper's 7B/9B/13B model mix.
- :mod:`~aegaeon.sim.device`: weight residency (the engine's slots, or bytes) and the host link
  a prefetch and KV moves share.
- :mod:`~aegaeon.sim.instance`: one instance executing TurnPlans in closed form (control round
  trip, switch, prefetch, KV moves, prefill, decode).
- :mod:`~aegaeon.sim.nodes`: fleets of nodes: each node's host cache of weights and the fetches
  over the network that fill it; the policies' locality hint.
- :mod:`~aegaeon.sim.engine`: the event loop (arrivals, turn ends) → per-token timestamps.
- :mod:`~aegaeon.sim.layout`: layouts offered to every policy, and what each policy holds.
- :mod:`~aegaeon.sim.run`: one run, the best layout at a GPU count, the fewest-GPUs bisection.
- :mod:`~aegaeon.sim.study`: GPUs needed per policy; :mod:`~aegaeon.sim.paper`: the paper study;
  :mod:`~aegaeon.sim.fleet`: GPUs needed on a fleet of nodes, with and without locality.
- :mod:`~aegaeon.sim.cli` / :mod:`~aegaeon.sim.report`: the command and its tables.
"""
