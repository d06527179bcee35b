"""Test suite of the QAT pipeline."""
