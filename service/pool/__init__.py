"""The engine workers and the API process's side of them: wire messages, clients, the worker, processes."""
