"""Ahead-of-time compilation of the real steps: what `vggjax plan` and `vggjax benchmark` stand on.

JAX compiles ahead of time for a TPU slice that is not attached: with libtpu installed (``pip install
'vggjax[tpu-plan]'``), ``jax.experimental.topologies.get_topology_desc`` gives the slice's devices on any machine
and ``jax.jit(...).lower(abstract arguments).compile()`` runs the real TPU compiler for them. On attached
devices (GPUs, or this machine's CPU) the same lowering compiles for them.

* ``target``: where the steps are compiled for (a TPU slice without the hardware, the attached devices), and
  the compile itself (``compile_step``);
* ``steps``: the steps ``vggjax.main`` runs (train, validation, dense evaluation) and their abstract
  arguments;
* ``analysis``: what the compiler says (memory, cost, out of memory);
* ``hlo``: what the compiled program's text says (collectives) and the padding-free FLOP count;
* ``roofline``: one compiled step's memory, FLOPs, collectives and ESTIMATED time (``step_report``);
* ``search``: the one largest-batch search, with a probe that compiles for a target;
* ``planner``: the plan of a config on a target (the report ``vggjax plan`` prints);
* ``report``: the plan's table.
"""
