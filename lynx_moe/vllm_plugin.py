"""vLLM general plugin (placeholder until the vLLM integration lands): does nothing."""


def register() -> None:
    return None
