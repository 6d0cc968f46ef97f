class MambaMixer: pass
