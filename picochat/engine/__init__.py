"""One engine for everything that generates. Read in this order: sampling.py (how a token is picked),
generation.py (one sequence's state and stop rules), prefill.py (reusing a cached prefix, computing the
rest in chunks), speculative.py (guessed tokens checked several to a pass), engine.py (one sequence at a time), batcher.py and rows.py (many at once: the server's
continuous batching and its prefix cache), session.py (a multi-turn chat that computes only new tokens)."""
