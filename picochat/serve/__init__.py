"""The OpenAI-compatible server and the chat page: protocol.py (typed requests and responses, errors),
openai.py (each endpoint a thin translation onto the engine), stream.py (the one SSE writer), state.py
(the loaded model, its engine thread, counters), knowledge.py (the knowledge bases it answers from),
app.py (routes and wiring only), web/index.html (the page)."""
