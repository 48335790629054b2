"""Structured output: decoding constrained to a grammar (JSON schema, regex, choice, Lark).

  backend.py      the interface a grammar library is adapted to (GrammarBackend -> Grammar -> Matcher)
  llguidance_backend.py  the llguidance adapter (the default backend; xgrammar would be a sibling file)
  manager.py      StructuredOutputs: compiles off the step path (one worker thread), caches compiled
                  grammars by canonical text, keeps one matcher per sequence and fills the sampler's
                  allowed-token bitmask for the rows that sample

The engine is the only user: it asks `is_ready(seq)` for the scheduler (a sequence waits in the queue
until its grammar is compiled), `bitmask(seqs, banned)` once per step and `accept(seq, token)` per
sampled token. A grammar that does not compile is a ValueError naming the problem.
"""
from qvl.structured.manager import StructuredOutputs

__all__ = ["StructuredOutputs"]
