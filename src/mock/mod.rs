//! Mock OpenAI-compatible LLM upstream for tests, benchmarks and the first run.
