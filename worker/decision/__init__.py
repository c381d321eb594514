"""Decisions on every result: our card checks and the tenant's warning policy (pure code).

`checks` (the card checks), `policy` (the policy model), `engine` (the decision), `facts` and
`apply` (a fresh answer or a stored row into the engine). SQL lives in `store` (the policy
table and its per-process cache) and `redecide` (`macao-ocr decide`). The vocabulary
(outcomes, effects, every reason code and its default) is `worker.reason_codes`, and the
policy's text and stored forms `worker.policy_text`: leaves below the settings, which check
MACAO_OCR_WARNING_POLICY at load.
"""
