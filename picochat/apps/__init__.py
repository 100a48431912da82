"""The uses of a ChatGPT, over any model behind backends.py: knowledge bases of the user's documents (kb.py,
documents.py) and grounded answers with citations (assistant.py), summaries of any length (summarize.py),
code checked against tests (codegen.py), and `picochat info` (info.py)."""
