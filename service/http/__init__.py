"""The API process's web side: app factory, routes, schemas, errors, metrics."""
