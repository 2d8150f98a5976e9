"""Serving over HTTP, the adapter between the web and the inference service: imports `model.inference` and
`utils`; serve.py builds and runs it.

- `schema`: OpenAI's request and response bodies (and ChatLM-mini-Chinese's), server-sent-event chunks, errors.
- `guards`: the API key, the cross-site checks (Origin, Host on loopback), reading a JSON body within its limit.
- `app`: `ServeArguments` and `create_app`, the FastAPI routes: parse, call `ChatService`, frame.
- `listening`: the socket bound before the model loads, and uvicorn in a thread (notebooks, tests).
"""
