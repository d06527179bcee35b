"""Orchestration of a factorial QAT study: phases, manifests, submission, collection."""
