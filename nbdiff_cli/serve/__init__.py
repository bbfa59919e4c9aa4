"""`nbdiff serve`: the command (`command`) and the FastAPI app it runs with uvicorn (`server`).

The batching engine and the OpenAI request/reply rules are the library's (`nbdiff.serve`); this
folder holds only what talks HTTP and people.
"""
