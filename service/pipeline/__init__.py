"""Questions to prompts and answers: prompting, routing, balancing, post-processing (imports no engine)."""
