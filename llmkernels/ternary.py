# stub: replaced by the ternary work
