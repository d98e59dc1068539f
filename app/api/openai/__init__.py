"""The OpenAI-compatible API: request shapes, conversion to workflows, and the relay."""
