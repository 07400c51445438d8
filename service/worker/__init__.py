"""The engine worker process (``python -m service.worker FD``): the engine, its backends and the answering that
needs the tokenizer.  Never imported by the API process (``service.http``, ``service.pool``)."""
