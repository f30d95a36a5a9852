"""Test doubles that speak real protocols (HTTP on 127.0.0.1), shared by the test modules.

``openai_server.FakeOpenAIServer``: an OpenAI-compatible chat server with scriptable faults.
"""
