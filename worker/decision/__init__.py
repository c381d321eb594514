"""Decisions on every result: our card checks and the tenant's warning policy (pure code).

`codes` (outcomes, effects, every reason code and its default), `checks` (the card checks),
`policy` (policy model and parsing), `engine` (the decision), `facts` and `apply` (a fresh
answer or a stored row into the engine). SQL lives in `store` (the policy table and its
per-process cache) and `redecide` (`macao-ocr decide`).
"""
