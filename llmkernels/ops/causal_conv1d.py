# stub: replaced by the selective scan work
def causal_conv1d_fn(*a, **k): raise NotImplementedError
def causal_conv1d_update(*a, **k): raise NotImplementedError
