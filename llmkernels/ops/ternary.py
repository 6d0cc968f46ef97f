# stub: replaced by the ternary work
def ternary_linear(*a, **k): raise NotImplementedError
def quantize_(*a, **k): raise NotImplementedError
