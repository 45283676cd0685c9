"""The OpenAI-compatible front door (`python -m phi3flow.front_door`)."""
