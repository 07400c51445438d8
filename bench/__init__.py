"""Measurement tools: `inv bench` (speed) and `inv eval` (answer quality) against the service."""
