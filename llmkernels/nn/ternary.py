class BitLinear: pass
class TernaryLinear: pass
