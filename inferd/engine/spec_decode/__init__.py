"""Speculative decoding: draft tokens proposed cheaply, verified by the target model in the normal step.

A draft is simply more new tokens of a request in a step (the engine's one rule):
`Speculator.extend` adds each decoding request's drafts to the scheduler's output
(within the token budget and the KV pool, never preempting for them), the runner
computes them with everything else and samples every draft position, and
`verify.accepted` keeps the drafts up to the first one the target model would not
have produced; the scheduler then counts only accepted tokens as computed and
releases the KV blocks that held nothing but rejected ones.

Parts: `config` (the options), `ngram` (prompt lookup: drafts copied from the
request's own tokens), `policy` (per step, how many drafts each request gets:
acceptance tracked per request against the measured cost of a step),
`verify` (the acceptance rule and the per-position view of a request the sampler
reads), `speculator` (ties them together and keeps the metrics).
"""
