"""Mixture of experts (router, token dispatchers, grouped experts, MoE layer). Not built yet;
the expert groups it will use (``ep``, ``etp``, ``edp``) already exist in ``ParallelDims``, and
``mcore.comm.all_to_all_uneven`` is the dispatcher's collective."""
