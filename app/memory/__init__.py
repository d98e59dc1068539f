"""Conversation memory in Redis: history, memory blocks, vectors, recall, context assembly.

Modules: ``keys`` (the Redis layout), ``store`` (conversations and ordered appends),
``blocks`` (memory blocks and their edit history), ``vectors`` (the ``VectorIndex`` seam),
``embedding`` (the embedding pool's queue and query embeddings), ``recall`` (reading memory
back), ``context`` (fitting a prompt to the model's window), ``summary`` (the rolling
summary), ``tools`` (the tool-call protocol), ``service`` (one process's handle).
The chat-step side runs in ``workers.memory``; the HTTP side in
``app.api.routes.conversations`` and ``app.api.routes.memory``.
"""
