"""ZenML pipeline wiring only; the work happens in steps/ and the llmtune library."""
