"""The QA service, in rooms by process (README, "Code layout"; ``tests/test_rooms.py`` holds the layers).

From the bottom: ``contract`` (wire frames, errors, the sampling schema), ``procs``, ``logs``, ``parsers``;
``settings``; ``pipeline`` (pure); then the API process (``pool``, then ``http``) beside the engine worker
(``worker``, over ``worker.backends``); the entry points ``asgi``, ``__main__`` and ``preflight`` on top.
"""
